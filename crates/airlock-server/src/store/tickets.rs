//! Viewer tickets (see `app::tickets`): digests only, single use.

use super::{q, Store, StoreError};
use sqlx::Row;

impl Store {
    /// Keep a new ticket; drop expired ones and, past `per_user` unused
    /// tickets of this user, the oldest.
    pub async fn insert_ticket(
        &self,
        digest: &str,
        sandbox_id: &str,
        user_id: &str,
        now: i64,
        expires_at: i64,
        per_user: u32,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin ticket"))?;
        sqlx::query("DELETE FROM viewer_tickets WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(q("drop expired tickets"))?;
        sqlx::query(
            "DELETE FROM viewer_tickets WHERE user_id = $1 AND digest NOT IN (SELECT digest \
             FROM viewer_tickets WHERE user_id = $1 ORDER BY expires_at DESC LIMIT $2)",
        )
        .bind(user_id)
        .bind(i64::from(per_user.saturating_sub(1)))
        .execute(&mut *tx)
        .await
        .map_err(q("drop a user's oldest tickets"))?;
        sqlx::query(
            "INSERT INTO viewer_tickets (digest, sandbox_id, user_id, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(digest)
        .bind(sandbox_id)
        .bind(user_id)
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .map_err(q("insert ticket"))?;
        tx.commit().await.map_err(q("commit ticket"))?;
        Ok(())
    }

    /// Take a ticket (it is gone after this, whatever it was): its sandbox,
    /// user and expiry.
    pub async fn take_ticket(
        &self,
        digest: &str,
    ) -> Result<Option<(String, String, i64)>, StoreError> {
        let row = sqlx::query(
            "DELETE FROM viewer_tickets WHERE digest = $1 RETURNING sandbox_id, user_id, expires_at",
        )
        .bind(digest)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("take ticket"))?;
        row.map(|r| {
            let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            Ok((
                r.try_get("sandbox_id").map_err(get)?,
                r.try_get("user_id").map_err(get)?,
                r.try_get("expires_at").map_err(get)?,
            ))
        })
        .transpose()
    }
}
