//! The one writer of a login's state: read the row, ask the machine
//! ([`super::state::transition`]), compare-and-set. A [`LoginWrite`] can only
//! be made here, and the store's compare-and-set takes nothing else, so no
//! code path writes a state the machine did not decide.

use super::state::{transition, Effect, Event, LoginState, Refused};
use crate::store::{now_ms, CredentialRow, LoginRow, Store, StoreError};

/// Lost races in a row before giving up (each loss means another writer
/// moved the login; the next read sees where it went).
const RACES: usize = 8;

/// A transition the machine decided, with the columns it writes. Built only
/// by [`advance`]; read by the store's compare-and-set.
#[derive(Debug)]
pub struct LoginWrite {
    pub(crate) id: String,
    pub(crate) from: LoginState,
    pub(crate) to: LoginState,
    pub(crate) reason: Option<String>,
    pub(crate) login_url: Option<String>,
    pub(crate) workspace_sandbox_id: Option<String>,
    /// `Stored`: the record written in the same transaction.
    pub(crate) credential: Option<CredentialRow>,
    /// `Delivered`: the record of this login marked delivered, in the same
    /// transaction.
    pub(crate) delivered: Option<(String, String)>,
    _only_advance: (),
}

#[derive(Debug, thiserror::Error)]
pub enum AdvanceError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("login {0:?} not found")]
    NotFound(String),
    #[error("the login kept changing under us")]
    Contended,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a successful [`advance`] did.
#[derive(Debug)]
pub struct Advanced {
    pub from: LoginState,
    /// The row as written.
    pub row: LoginRow,
    /// What to do next, in order.
    pub effects: Vec<Effect>,
}

fn write_for(row: &LoginRow, to: LoginState, event: &Event) -> LoginWrite {
    let mut w = LoginWrite {
        id: row.id.clone(),
        from: row.state,
        to,
        reason: event.reason(),
        login_url: None,
        workspace_sandbox_id: None,
        credential: None,
        delivered: None,
        _only_advance: (),
    };
    match event {
        Event::UrlCaptured { url } => w.login_url = Some(url.clone()),
        Event::Captured { url } => w.login_url = url.clone(),
        Event::Stored(record) => {
            let now = now_ms();
            w.credential = Some(CredentialRow {
                owner_id: row.owner_id.clone(),
                provider: row.provider.clone(),
                login_id: row.id.clone(),
                sealed: record.sealed.clone(),
                key_id: record.key_id.clone(),
                created_at: now,
                updated_at: now,
                delivered_at: None,
            });
        }
        Event::Delivered { workspace } => {
            w.workspace_sandbox_id = Some(workspace.clone());
            w.delivered = Some((row.owner_id.clone(), row.provider.clone()));
        }
        _ => {}
    }
    w
}

/// Apply `event` to login `id`: the machine decides, the store writes with a
/// compare-and-set on the state read, and a lost race reads again (the event
/// may then be refused by the state another writer left).
pub async fn advance(store: &Store, id: &str, event: &Event) -> Result<Advanced, AdvanceError> {
    for _ in 0..RACES {
        let row = store
            .login(id)
            .await?
            .ok_or_else(|| AdvanceError::NotFound(id.to_owned()))?;
        let (to, effects) = transition(row.state, event)?;
        let write = write_for(&row, to, event);
        if store.write_login(&write).await? {
            let row = store
                .login(id)
                .await?
                .ok_or_else(|| AdvanceError::NotFound(id.to_owned()))?;
            tracing::debug!(login = %id, from = %write.from, to = %to, event = event.name(), "login advanced");
            return Ok(Advanced {
                from: write.from,
                row,
                effects,
            });
        }
    }
    Err(AdvanceError::Contended)
}
