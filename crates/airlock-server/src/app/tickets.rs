//! Viewer tickets: what a WebSocket URL carries instead of the long-lived API
//! token. A ticket is 256 random bits, good for one connection, for one
//! sandbox and one user, for at most [`TICKET_TTL`]. Only its SHA-256 is
//! kept, in this process's memory: with several control-plane replicas a
//! ticket must live in the shared store instead.

use super::{App, AppError};
use crate::store::UserRow;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Unused tickets one user may hold at once; the oldest go first.
const PER_USER: usize = 32;

#[derive(Debug)]
struct Entry {
    sandbox_id: String,
    user_id: String,
    expires: Instant,
}

#[derive(Debug, Default)]
pub struct Tickets {
    live: Mutex<HashMap<[u8; 32], Entry>>,
}

/// A ticket as handed to its user (the only time its value exists).
#[derive(Debug)]
pub struct Issued {
    pub ticket: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

fn digest(ticket: &str) -> [u8; 32] {
    Sha256::digest(ticket.as_bytes()).into()
}

impl Tickets {
    pub fn issue(&self, sandbox_id: &str, user_id: &str, now: Instant) -> String {
        let ticket = format!("vt_{}", hex::encode(rand::random::<[u8; 32]>()));
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, e| e.expires > now);
        let mut mine: Vec<([u8; 32], Instant)> = live
            .iter()
            .filter(|(_, e)| e.user_id == user_id)
            .map(|(k, e)| (*k, e.expires))
            .collect();
        if mine.len() >= PER_USER {
            mine.sort_by_key(|(_, at)| *at);
            for (k, _) in &mine[..=mine.len() - PER_USER] {
                live.remove(k);
            }
        }
        live.insert(
            digest(&ticket),
            Entry {
                sandbox_id: sandbox_id.to_owned(),
                user_id: user_id.to_owned(),
                expires: now + TICKET_TTL,
            },
        );
        ticket
    }

    /// The user a ticket was issued to, if it is live and for this sandbox.
    /// A ticket is gone after this call, whatever the answer.
    pub fn redeem(&self, ticket: &str, sandbox_id: &str, now: Instant) -> Option<String> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let entry = live.remove(&digest(ticket))?;
        (entry.expires > now && entry.sandbox_id == sandbox_id).then_some(entry.user_id)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl App {
    /// `POST /sandboxes/{id}/tickets`: for the sandbox's owner only.
    pub async fn issue_ticket(&self, user: &UserRow, sandbox_id: &str) -> Result<Issued, AppError> {
        let row = self.sandbox_of(user, sandbox_id).await?;
        let ticket = self.tickets.issue(&row.id, &user.id, Instant::now());
        let ttl = i64::try_from(TICKET_TTL.as_millis()).unwrap_or(i64::MAX);
        Ok(Issued {
            ticket,
            expires_at: crate::store::now_ms().saturating_add(ttl),
        })
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
        let Some(user_id) = self.tickets.redeem(ticket, sandbox_id, Instant::now()) else {
            return Ok(None);
        };
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

    #[test]
    fn a_ticket_works_once_for_its_sandbox_within_its_time() {
        let t = Tickets::default();
        let now = Instant::now();
        let a = t.issue("sb1", "u1", now);
        assert!(a.starts_with("vt_") && a.len() == 3 + 64, "{a}");
        assert_eq!(t.redeem(&a, "sb1", now).as_deref(), Some("u1"));
        assert_eq!(t.redeem(&a, "sb1", now), None, "single use");

        let b = t.issue("sb1", "u1", now);
        assert_eq!(t.redeem(&b, "sb2", now), None, "another sandbox");
        assert_eq!(t.redeem(&b, "sb1", now), None, "burnt by the wrong try");

        let c = t.issue("sb1", "u1", now);
        assert_eq!(t.redeem(&c, "sb1", now + TICKET_TTL), None, "expired");
        assert_eq!(t.redeem("vt_nonsense", "sb1", now), None);
        assert_ne!(t.issue("sb1", "u1", now), t.issue("sb1", "u1", now));
    }

    #[test]
    fn unused_tickets_are_bounded_per_user_and_expire() {
        let t = Tickets::default();
        let now = Instant::now();
        let first = t.issue("sb", "u1", now);
        for i in 1..(PER_USER as u64 * 3) {
            t.issue("sb", "u1", now + Duration::from_millis(i));
        }
        t.issue("sb", "u2", now);
        assert_eq!(t.len(), PER_USER + 1);
        assert_eq!(t.redeem(&first, "sb", now), None, "the oldest went first");
        t.issue("sb", "u3", now + TICKET_TTL * 2);
        assert_eq!(t.len(), 1, "expired ones are dropped");
    }
}
