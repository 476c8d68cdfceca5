//! View shares (see `app::shares`): a row per live share, the secret's
//! digest only. Revoking deletes the row; expired rows are dropped whenever
//! a share is created.

use super::{q, Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRow {
    pub id: String,
    pub sandbox_id: String,
    pub owner_id: String,
    pub input: bool,
    pub created_at: i64,
    pub expires_at: i64,
}

const COLUMNS: &str = "id, sandbox_id, owner_id, input, created_at, expires_at";

fn from_row(row: &AnyRow) -> Result<ShareRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(ShareRow {
        id: row.try_get("id").map_err(get)?,
        sandbox_id: row.try_get("sandbox_id").map_err(get)?,
        owner_id: row.try_get("owner_id").map_err(get)?,
        input: row.try_get::<i64, _>("input").map_err(get)? != 0,
        created_at: row.try_get("created_at").map_err(get)?,
        expires_at: row.try_get("expires_at").map_err(get)?,
    })
}

impl Store {
    /// Keep a new share, unless its sandbox already has `per_sandbox` live
    /// ones (then `false`); expired shares go first.
    pub async fn insert_share(
        &self,
        row: &ShareRow,
        digest: &str,
        per_sandbox: u32,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin share"))?;
        sqlx::query("DELETE FROM view_shares WHERE expires_at <= $1")
            .bind(row.created_at)
            .execute(&mut *tx)
            .await
            .map_err(q("drop expired shares"))?;
        let live: i64 = sqlx::query("SELECT COUNT(*) AS n FROM view_shares WHERE sandbox_id = $1")
            .bind(&row.sandbox_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(q("count shares"))?
            .try_get("n")
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if live >= i64::from(per_sandbox) {
            return Ok(false);
        }
        let sql = format!(
            "INSERT INTO view_shares ({COLUMNS}, digest) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        );
        sqlx::query(&sql)
            .bind(&row.id)
            .bind(&row.sandbox_id)
            .bind(&row.owner_id)
            .bind(i64::from(row.input))
            .bind(row.created_at)
            .bind(row.expires_at)
            .bind(digest)
            .execute(&mut *tx)
            .await
            .map_err(q("insert share"))?;
        tx.commit().await.map_err(q("commit share"))?;
        Ok(true)
    }

    /// The share a secret's digest stands for (expired or not).
    pub async fn share_by_digest(&self, digest: &str) -> Result<Option<ShareRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM view_shares WHERE digest = $1");
        sqlx::query(&sql)
            .bind(digest)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("share by digest"))?
            .as_ref()
            .map(from_row)
            .transpose()
    }

    pub async fn share(&self, id: &str) -> Result<Option<ShareRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM view_shares WHERE id = $1");
        sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("share"))?
            .as_ref()
            .map(from_row)
            .transpose()
    }

    /// A sandbox's shares that have not expired by `now`, oldest first.
    pub async fn shares_of(&self, sandbox_id: &str, now: i64) -> Result<Vec<ShareRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM view_shares WHERE sandbox_id = $1 AND expires_at > $2 \
             ORDER BY created_at, id"
        );
        sqlx::query(&sql)
            .bind(sandbox_id)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(q("shares of a sandbox"))?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Switch a share between read-only and input; whether it was there.
    pub async fn set_share_input(&self, id: &str, input: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE view_shares SET input = $1 WHERE id = $2")
            .bind(i64::from(input))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("set share input"))?;
        Ok(done.rows_affected() > 0)
    }

    /// Revoke a share; whether it was there.
    pub async fn delete_share(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM view_shares WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("delete share"))?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, sandbox: &str, created_at: i64, expires_at: i64) -> ShareRow {
        ShareRow {
            id: id.into(),
            sandbox_id: sandbox.into(),
            owner_id: "u1".into(),
            input: false,
            created_at,
            expires_at,
        }
    }

    async fn exercise(store: &Store) {
        let now = crate::store::now_ms();
        let a = row("sh_a", "sb1", now, now + 60_000);
        assert!(store.insert_share(&a, "da", 2).await.expect("insert"));
        assert_eq!(
            store.share_by_digest("da").await.expect("q"),
            Some(a.clone())
        );
        assert_eq!(store.share_by_digest("nope").await.expect("q"), None);
        // The digest is unique.
        let dup = row("sh_dup", "sb1", now, now + 60_000);
        assert!(store.insert_share(&dup, "da", 2).await.is_err());
        // An expired share does not count against the cap and goes on insert.
        let old = row("sh_old", "sb1", now - 120_000, now - 60_000);
        assert!(store.insert_share(&old, "dold", 3).await.expect("insert"));
        let b = row("sh_b", "sb1", now + 1, now + 60_000);
        assert!(store.insert_share(&b, "db", 2).await.expect("insert"));
        assert_eq!(store.share("sh_old").await.expect("q"), None, "dropped");
        let c = row("sh_c", "sb1", now + 2, now + 60_000);
        assert!(
            !store.insert_share(&c, "dc", 2).await.expect("insert"),
            "capped"
        );
        let other = row("sh_o", "sb2", now, now + 60_000);
        assert!(store.insert_share(&other, "do", 2).await.expect("insert"));
        let ids: Vec<String> = store
            .shares_of("sb1", now)
            .await
            .expect("list")
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["sh_a", "sh_b"]);
        assert!(store.set_share_input("sh_a", true).await.expect("set"));
        assert!(store.share("sh_a").await.expect("q").expect("row").input);
        assert!(!store.set_share_input("sh_gone", true).await.expect("set"));
        assert!(store.delete_share("sh_a").await.expect("delete"));
        assert!(!store.delete_share("sh_a").await.expect("delete"));
        assert_eq!(store.share_by_digest("da").await.expect("q"), None);
    }

    #[tokio::test]
    async fn shares_on_sqlite() {
        let (store, _dir) = crate::store::tests::sqlite().await;
        exercise(&store).await;
    }

    #[tokio::test]
    async fn shares_on_postgres() {
        if let Some(store) = crate::store::tests::postgres().await {
            exercise(&store).await;
        }
    }
}
