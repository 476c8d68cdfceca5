//! View shares: a link a sandbox's owner hands to a second person, who then
//! watches the desktop without an account. A share is a 256-bit secret
//! (`vs_…`, only its SHA-256 kept), good for many connections, for one
//! sandbox, until it expires (at most [`MAX_TTL`]) or its owner revokes it.
//! It is read-only unless the owner grants input; the relay enforces that
//! (`relay::readonly`), and an open shared viewer follows a switch or a
//! revocation within [`WATCH_EVERY`].

use super::{App, AppError};
use crate::relay::gate::ViewGate;
use crate::store::{now_ms, ShareRow, UserRow};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MIN_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Live shares one sandbox may have.
pub const PER_SANDBOX: u32 = 16;
/// How often an open shared viewer looks at its share again.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A new share as handed to its owner: the only time its secret exists.
#[derive(Debug)]
pub struct NewShare {
    pub row: ShareRow,
    pub secret: String,
}

/// A redeemed share: the sandbox's owner (whose sandbox it views) and the
/// share's row.
#[derive(Debug)]
pub struct Redeemed {
    pub owner: UserRow,
    pub share: ShareRow,
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl App {
    /// `POST /sandboxes/{id}/shares`: the owner only; `ttl` within
    /// [`MIN_TTL`]..=[`MAX_TTL`].
    pub async fn create_share(
        &self,
        user: &UserRow,
        sandbox_id: &str,
        ttl: Duration,
        input: bool,
    ) -> Result<NewShare, AppError> {
        let sb = self.sandbox_of(user, sandbox_id).await?;
        if ttl < MIN_TTL || ttl > MAX_TTL {
            return Err(AppError::BadInput(format!(
                "ttl_s must be from {} to {} seconds",
                MIN_TTL.as_secs(),
                MAX_TTL.as_secs()
            )));
        }
        let secret = format!("vs_{}", hex::encode(rand::random::<[u8; 32]>()));
        let now = now_ms();
        let row = ShareRow {
            id: format!("sh_{}", hex::encode(rand::random::<[u8; 8]>())),
            sandbox_id: sb.id.clone(),
            owner_id: user.id.clone(),
            input,
            created_at: now,
            expires_at: now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
        };
        if !self
            .store
            .insert_share(&row, &digest(&secret), PER_SANDBOX)
            .await?
        {
            return Err(AppError::Conflict(format!(
                "sandbox {sandbox_id:?} has {PER_SANDBOX} live shares already; revoke one first"
            )));
        }
        tracing::info!(user = %user.name, sandbox = %sb.id, share = %row.id, input, ttl_s = ttl.as_secs(), "view share created");
        Ok(NewShare { row, secret })
    }

    /// `GET /sandboxes/{id}/shares`: the live ones, never their secrets.
    pub async fn shares(
        &self,
        user: &UserRow,
        sandbox_id: &str,
    ) -> Result<Vec<ShareRow>, AppError> {
        let sb = self.sandbox_of(user, sandbox_id).await?;
        Ok(self.store.shares_of(&sb.id, now_ms()).await?)
    }

    async fn share_of(
        &self,
        user: &UserRow,
        sandbox_id: &str,
        share_id: &str,
    ) -> Result<ShareRow, AppError> {
        let sb = self.sandbox_of(user, sandbox_id).await?;
        match self.store.share(share_id).await? {
            Some(s)
                if s.sandbox_id == sb.id && s.owner_id == user.id && s.expires_at > now_ms() =>
            {
                Ok(s)
            }
            _ => Err(AppError::NotFound(format!("share {share_id:?}"))),
        }
    }

    /// `PATCH …/shares/{share_id}`: grant or take back input.
    pub async fn set_share_input(
        &self,
        user: &UserRow,
        sandbox_id: &str,
        share_id: &str,
        input: bool,
    ) -> Result<ShareRow, AppError> {
        let mut row = self.share_of(user, sandbox_id, share_id).await?;
        if !self.store.set_share_input(&row.id, input).await? {
            return Err(AppError::NotFound(format!("share {share_id:?}")));
        }
        tracing::info!(user = %user.name, sandbox = %row.sandbox_id, share = %row.id, input, "view share switched");
        row.input = input;
        Ok(row)
    }

    /// `DELETE …/shares/{share_id}`: open viewers of it close within
    /// [`WATCH_EVERY`].
    pub async fn revoke_share(
        &self,
        user: &UserRow,
        sandbox_id: &str,
        share_id: &str,
    ) -> Result<(), AppError> {
        let row = self.share_of(user, sandbox_id, share_id).await?;
        self.store.delete_share(&row.id).await?;
        tracing::info!(user = %user.name, sandbox = %row.sandbox_id, share = %row.id, "view share revoked");
        Ok(())
    }

    /// What a share secret opens, or `None` when it is unknown, revoked,
    /// expired, for another sandbox, or its owner may no longer sign in.
    pub async fn redeem_share(
        &self,
        secret: &str,
        sandbox_id: &str,
    ) -> Result<Option<Redeemed>, AppError> {
        let Some(share) = self.store.share_by_digest(&digest(secret)).await? else {
            return Ok(None);
        };
        if share.expires_at <= now_ms() || share.sandbox_id != sandbox_id {
            return Ok(None);
        }
        let owner = self
            .store
            .user_by_id(&share.owner_id)
            .await?
            .filter(|u| !u.disabled && !u.removing);
        Ok(owner.map(|owner| Redeemed { owner, share }))
    }

    /// A gate for one shared viewer, kept in step with its share until the
    /// returned task is aborted: input follows the owner's switch, and the
    /// gate ends when the share is revoked or expires.
    pub fn watch_share(
        self: &Arc<Self>,
        share: &ShareRow,
    ) -> (Arc<ViewGate>, tokio::task::JoinHandle<()>) {
        let gate = Arc::new(ViewGate::new(share.input));
        let (app, id, g) = (self.clone(), share.id.clone(), gate.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                match app.store.share(&id).await {
                    Ok(Some(s)) if s.expires_at > now_ms() => g.set_input(s.input),
                    Ok(Some(_)) => return g.end("the share link has expired"),
                    Ok(None) => return g.end("the owner revoked this share link"),
                    // A store hiccup: look again next time.
                    Err(e) => tracing::debug!(share = %id, error = %e, "share check failed"),
                }
            }
        });
        (gate, task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::lifecycle_tests::World;
    use airlock_proto::metadata::SandboxKind;

    #[tokio::test]
    async fn a_share_opens_its_sandbox_until_revoked_or_expired() {
        let w = World::new().await;
        let sb = w
            .app
            .create_sandbox(&w.user, SandboxKind::Browser)
            .await
            .expect("create");
        let made = w
            .app
            .create_share(&w.user, &sb.id, Duration::from_secs(600), false)
            .await
            .expect("share");
        assert!(made.secret.starts_with("vs_") && made.secret.len() == 3 + 64);
        let got = w
            .app
            .redeem_share(&made.secret, &sb.id)
            .await
            .expect("redeem")
            .expect("valid");
        assert_eq!(got.owner.id, w.user.id);
        assert!(!got.share.input);
        // Many uses.
        assert!(w
            .app
            .redeem_share(&made.secret, &sb.id)
            .await
            .expect("redeem")
            .is_some());
        assert!(w
            .app
            .redeem_share(&made.secret, "other")
            .await
            .expect("redeem")
            .is_none());
        assert!(w
            .app
            .redeem_share("vs_nonsense", &sb.id)
            .await
            .expect("redeem")
            .is_none());
        // Listed without the secret; input switched; revoked.
        let listed = w.app.shares(&w.user, &sb.id).await.expect("list");
        assert_eq!(
            listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            [made.row.id.as_str()]
        );
        let switched = w
            .app
            .set_share_input(&w.user, &sb.id, &made.row.id, true)
            .await
            .expect("patch");
        assert!(switched.input);
        let got = w
            .app
            .redeem_share(&made.secret, &sb.id)
            .await
            .expect("redeem")
            .expect("valid");
        assert!(got.share.input);
        w.app
            .revoke_share(&w.user, &sb.id, &made.row.id)
            .await
            .expect("revoke");
        assert!(w
            .app
            .redeem_share(&made.secret, &sb.id)
            .await
            .expect("redeem")
            .is_none());
        assert!(w
            .app
            .shares(&w.user, &sb.id)
            .await
            .expect("list")
            .is_empty());
        let again = w.app.revoke_share(&w.user, &sb.id, &made.row.id).await;
        assert!(matches!(again, Err(AppError::NotFound(_))), "{again:?}");

        // Expired: written as if made an hour ago for ten minutes.
        let past = now_ms() - 3_600_000;
        let old = ShareRow {
            id: "sh_old".into(),
            sandbox_id: sb.id.clone(),
            owner_id: w.user.id.clone(),
            input: false,
            created_at: past,
            expires_at: past + 600_000,
        };
        assert!(w
            .store
            .insert_share(&old, &digest("vs_old"), PER_SANDBOX)
            .await
            .expect("insert"));
        assert!(
            w.app
                .redeem_share("vs_old", &sb.id)
                .await
                .expect("redeem")
                .is_none(),
            "expired"
        );
        assert!(w
            .app
            .shares(&w.user, &sb.id)
            .await
            .expect("list")
            .is_empty());
    }

    #[tokio::test]
    async fn ttl_is_bounded_and_another_user_sees_nothing() {
        let w = World::new().await;
        let sb = w
            .app
            .create_sandbox(&w.user, SandboxKind::Browser)
            .await
            .expect("create");
        for ttl in [0, 59, 24 * 3600 + 1] {
            let got = w
                .app
                .create_share(&w.user, &sb.id, Duration::from_secs(ttl), false)
                .await;
            assert!(matches!(got, Err(AppError::BadInput(_))), "{ttl}: {got:?}");
        }
        assert!(
            w.store.shares_of(&sb.id, 0).await.expect("q").is_empty(),
            "nothing made"
        );
        let made = w
            .app
            .create_share(&w.user, &sb.id, DEFAULT_TTL, false)
            .await
            .expect("share");
        let other = w
            .store
            .insert_user("u-mallory", "mallory", None)
            .await
            .expect("user");
        let nf = |r: Result<_, AppError>| matches!(r, Err(AppError::NotFound(_)));
        assert!(nf(w
            .app
            .create_share(&other, &sb.id, DEFAULT_TTL, false)
            .await
            .map(|_| ())));
        assert!(nf(w.app.shares(&other, &sb.id).await.map(|_| ())));
        assert!(nf(w
            .app
            .set_share_input(&other, &sb.id, &made.row.id, true)
            .await
            .map(|_| ())));
        assert!(nf(w.app.revoke_share(&other, &sb.id, &made.row.id).await));
        assert!(
            w.app
                .redeem_share(&made.secret, &sb.id)
                .await
                .expect("redeem")
                .is_some(),
            "untouched"
        );
        for _ in 1..PER_SANDBOX {
            w.app
                .create_share(&w.user, &sb.id, DEFAULT_TTL, false)
                .await
                .expect("share");
        }
        let full = w
            .app
            .create_share(&w.user, &sb.id, DEFAULT_TTL, false)
            .await;
        assert!(matches!(full, Err(AppError::Conflict(_))), "{full:?}");
    }

    #[tokio::test]
    async fn an_open_viewer_follows_its_share() {
        let w = World::new().await;
        let sb = w
            .app
            .create_sandbox(&w.user, SandboxKind::Browser)
            .await
            .expect("create");
        let made = w
            .app
            .create_share(&w.user, &sb.id, DEFAULT_TTL, false)
            .await
            .expect("share");
        let (gate, task) = w.app.watch_share(&made.row);
        assert!(!gate.input_allowed());
        w.app
            .set_share_input(&w.user, &sb.id, &made.row.id, true)
            .await
            .expect("patch");
        tokio::time::sleep(WATCH_EVERY * 2 + Duration::from_millis(200)).await;
        assert!(gate.input_allowed(), "input granted while open");
        w.app
            .revoke_share(&w.user, &sb.id, &made.row.id)
            .await
            .expect("revoke");
        let why = tokio::time::timeout(WATCH_EVERY * 3, gate.ended())
            .await
            .expect("ended in time");
        assert!(why.contains("revoked"), "{why}");
        task.abort();
    }
}
