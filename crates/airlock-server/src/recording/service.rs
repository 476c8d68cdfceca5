//! The app's side of recordings: ownership, the login rule, and the link to
//! the sandbox's video hub. The HTTP handlers in `http/recordings.rs` call these.

use super::{Meta, RecordingError};
use crate::app::{App, AppError};
use crate::store::UserRow;

impl From<RecordingError> for AppError {
    fn from(e: RecordingError) -> Self {
        match e {
            RecordingError::NotFound(id) => AppError::NotFound(format!("recording {id:?}")),
            RecordingError::Io(e) => AppError::Internal(format!("recording storage: {e}")),
            e => AppError::Conflict(e.to_string()),
        }
    }
}

impl App {
    /// Is this sandbox a login's browser sandbox (credentials are typed into it)?
    async fn is_login_sandbox(&self, owner_id: &str, sandbox_id: &str) -> Result<bool, AppError> {
        Ok(self
            .store
            .logins_of(owner_id)
            .await?
            .iter()
            .any(|l| l.browser_sandbox_id.as_deref() == Some(sandbox_id)))
    }

    /// Start recording a ready sandbox of the caller's.
    pub async fn start_recording(&self, user: &UserRow, id: &str) -> Result<Meta, AppError> {
        let row = self.sandbox_of(user, id).await?;
        let login = self.is_login_sandbox(&row.owner_id, &row.id).await?;
        self.recordings.may_start(&row.id, login)?;
        let endpoints = self.ready_endpoints(&row).await?;
        let hub = self.streams.join(crate::webrtc::hub::GuestStream {
            sandbox_id: row.id.clone(),
            agent: endpoints.stream,
            token: row.agent_token.clone(),
            fps: self.cfg.webrtc_fps,
        });
        Ok(self.recordings.start(hub, &row.owner_id, login).await?)
    }

    /// Stop the sandbox's recording under way; `rid` is `current` or its id.
    pub async fn stop_recording(
        &self,
        user: &UserRow,
        id: &str,
        rid: &str,
    ) -> Result<Meta, AppError> {
        let row = self.sandbox_of(user, id).await?;
        match self.recordings.current(&row.id) {
            Some(cur) if rid == "current" || rid == cur => {
                Ok(self.recordings.stop(&row.id).await?)
            }
            _ => Err(RecordingError::NotRecording(row.id).into()),
        }
    }

    /// The sandbox's recordings and the one under way, if any.
    pub async fn recordings_of(
        &self,
        user: &UserRow,
        id: &str,
    ) -> Result<(Vec<Meta>, Option<String>), AppError> {
        let row = self.sandbox_of(user, id).await?;
        let mut list = self.recordings.list(&row.id).await?;
        list.retain(|m| m.owner_id == user.id);
        Ok((list, self.recordings.current(&row.id)))
    }

    /// One recording of the caller's and where its file is.
    pub async fn recording_of(
        &self,
        user: &UserRow,
        id: &str,
        rid: &str,
    ) -> Result<(Meta, std::path::PathBuf), AppError> {
        let row = self.sandbox_of(user, id).await?;
        let meta = self.recordings.get(&row.id, rid).await?;
        if meta.owner_id != user.id {
            return Err(RecordingError::NotFound(rid.into()).into());
        }
        let path = self.recordings.file(&meta)?;
        Ok((meta, path))
    }
}
