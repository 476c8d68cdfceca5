//! Viewer tickets: what a WebSocket URL carries instead of the long-lived API
//! token. A ticket is 256 random bits, good for one connection, for one
//! sandbox and one user, for at most [`TICKET_TTL`]. Only its SHA-256 is
//! kept, in the store, so any replica redeems what another issued.

use super::{App, AppError};
use crate::store::{now_ms, UserRow};
use sha2::{Digest, Sha256};
use std::time::Duration;

pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Unused tickets one user may hold at once; the oldest go first.
const PER_USER: u32 = 32;

/// A ticket as handed to its user (the only time its value exists).
#[derive(Debug)]
pub struct Issued {
    pub ticket: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

fn digest(ticket: &str) -> String {
    hex::encode(Sha256::digest(ticket.as_bytes()))
}

fn ttl_ms() -> i64 {
    i64::try_from(TICKET_TTL.as_millis()).unwrap_or(i64::MAX)
}

impl App {
    /// `POST /sandboxes/{id}/tickets`: for the sandbox's owner only.
    pub async fn issue_ticket(&self, user: &UserRow, sandbox_id: &str) -> Result<Issued, AppError> {
        let row = self.sandbox_of(user, sandbox_id).await?;
        let ticket = format!("vt_{}", hex::encode(rand::random::<[u8; 32]>()));
        let now = now_ms();
        let expires_at = now.saturating_add(ttl_ms());
        self.store
            .insert_ticket(
                &digest(&ticket),
                &row.id,
                &user.id,
                now,
                expires_at,
                PER_USER,
            )
            .await?;
        Ok(Issued { ticket, expires_at })
    }

    /// The user a viewer ticket stands for, or `None` when it is unknown,
    /// used, expired, or for another sandbox, or when its user is gone or
    /// may no longer sign in ([`may_sign_in`]): a ticket is worth no more
    /// than the token it was asked for with.
    pub async fn redeem_ticket(
        &self,
        ticket: &str,
        sandbox_id: &str,
    ) -> Result<Option<UserRow>, AppError> {
        let Some((for_sandbox, user_id, expires_at)) =
            self.store.take_ticket(&digest(ticket)).await?
        else {
            return Ok(None);
        };
        if expires_at <= now_ms() || for_sandbox != sandbox_id {
            return Ok(None);
        }
        Ok(self.store.user_by_id(&user_id).await?.filter(may_sign_in))
    }
}

/// Whether this user may still act: the same test the token path makes when
/// it finds a token's owner. A disabled user, or one being removed, may not:
/// a ticket issued before that stops working with the token.
fn may_sign_in(user: &UserRow) -> bool {
    !user.disabled && !user.removing
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::lifecycle_tests::World;

    #[tokio::test]
    async fn a_ticket_works_once_for_its_sandbox_within_its_time() {
        let w = World::new().await;
        let sb = w
            .app
            .create_sandbox(&w.user, airlock_proto::metadata::SandboxKind::Browser)
            .await
            .expect("create");
        let a = w
            .app
            .issue_ticket(&w.user, &sb.id)
            .await
            .expect("issue")
            .ticket;
        assert!(a.starts_with("vt_") && a.len() == 3 + 64, "{a}");
        let redeem = |t: String, id: &str| {
            let (app, id) = (w.app.clone(), id.to_owned());
            async move {
                app.redeem_ticket(&t, &id)
                    .await
                    .expect("redeem")
                    .map(|u| u.id)
            }
        };
        assert_eq!(redeem(a.clone(), &sb.id).await, Some(w.user.id.clone()));
        assert_eq!(redeem(a, &sb.id).await, None, "single use");
        let b = w
            .app
            .issue_ticket(&w.user, &sb.id)
            .await
            .expect("issue")
            .ticket;
        assert_eq!(redeem(b.clone(), "another").await, None, "another sandbox");
        assert_eq!(redeem(b, &sb.id).await, None, "burnt by the wrong try");
        assert_eq!(redeem("vt_nonsense".into(), &sb.id).await, None);
        // Expired: written as if issued a TTL ago.
        let old = "vt_old".to_owned();
        let past = now_ms() - ttl_ms();
        w.store
            .insert_ticket(
                &digest(&old),
                &sb.id,
                &w.user.id,
                past,
                past + ttl_ms(),
                PER_USER,
            )
            .await
            .expect("insert");
        assert_eq!(redeem(old, &sb.id).await, None, "expired");
    }

    #[tokio::test]
    async fn unused_tickets_are_bounded_per_user() {
        let w = World::new().await;
        let sb = w
            .app
            .create_sandbox(&w.user, airlock_proto::metadata::SandboxKind::Browser)
            .await
            .expect("create");
        let first = w
            .app
            .issue_ticket(&w.user, &sb.id)
            .await
            .expect("issue")
            .ticket;
        // Later tickets expire later (each a millisecond apart at least).
        for _ in 0..PER_USER {
            tokio::time::sleep(Duration::from_millis(2)).await;
            w.app.issue_ticket(&w.user, &sb.id).await.expect("issue");
        }
        let got = w.app.redeem_ticket(&first, &sb.id).await.expect("redeem");
        assert!(got.is_none(), "the oldest went first");
        let last = w
            .app
            .issue_ticket(&w.user, &sb.id)
            .await
            .expect("issue")
            .ticket;
        let got = w.app.redeem_ticket(&last, &sb.id).await.expect("redeem");
        assert!(got.is_some(), "the newest works");
    }
}
