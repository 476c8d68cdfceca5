//! Every vault record the database holds, in one place: what `airlock vault
//! rotate` re-seals and what decides whether an old key may be retired. A new
//! sealed column must be listed here, or rotation would strand it under a
//! retired key.

use super::{egress::ACCOUNT_ID, q, Store, StoreError};
use sqlx::Row;

/// Which row a sealed value lives in; it is also what the value is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealedRef {
    /// `credentials.sealed` of a user and provider.
    Credential {
        owner_id: String,
        provider: String,
        login_id: String,
    },
    /// `egress_accounts.password_sealed` of the provider account.
    EgressAccount,
    /// `egress_user_upstreams.password_sealed` of a user.
    EgressUpstream { user_id: String },
}

/// A sealed value and its place.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedValue {
    pub at: SealedRef,
    pub sealed: String,
}

impl std::fmt::Debug for SealedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedValue")
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

fn text(row: &sqlx::any::AnyRow, col: &str) -> Result<String, StoreError> {
    row.try_get(col)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

async fn all_in(conn: &mut sqlx::AnyConnection) -> Result<Vec<SealedValue>, StoreError> {
    let mut out = Vec::new();
    for r in sqlx::query("SELECT owner_id, provider, login_id, sealed FROM credentials")
        .fetch_all(&mut *conn)
        .await
        .map_err(q("list sealed credentials"))?
    {
        out.push(SealedValue {
            at: SealedRef::Credential {
                owner_id: text(&r, "owner_id")?,
                provider: text(&r, "provider")?,
                login_id: text(&r, "login_id")?,
            },
            sealed: text(&r, "sealed")?,
        });
    }
    for r in sqlx::query("SELECT id, password_sealed FROM egress_accounts")
        .fetch_all(&mut *conn)
        .await
        .map_err(q("list sealed egress accounts"))?
    {
        if text(&r, "id")? != ACCOUNT_ID {
            return Err(StoreError::Corrupt(
                "an egress account other than the one".into(),
            ));
        }
        out.push(SealedValue {
            at: SealedRef::EgressAccount,
            sealed: text(&r, "password_sealed")?,
        });
    }
    for r in sqlx::query("SELECT user_id, password_sealed FROM egress_user_upstreams")
        .fetch_all(&mut *conn)
        .await
        .map_err(q("list sealed upstreams"))?
    {
        out.push(SealedValue {
            at: SealedRef::EgressUpstream {
                user_id: text(&r, "user_id")?,
            },
            sealed: text(&r, "password_sealed")?,
        });
    }
    Ok(out)
}

impl Store {
    /// Every sealed value in the database.
    pub async fn sealed_values(&self) -> Result<Vec<SealedValue>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(q("connect"))?;
        all_in(&mut conn).await
    }

    /// Re-seal in one transaction: `reseal` gets every sealed value and returns
    /// its replacement (`Some`), or `None` to leave it. The first `Err` from
    /// `reseal` rolls everything back and is returned as the inner error. A
    /// value another writer changed meanwhile is left as that writer made it.
    /// `key_id` is recorded beside credentials (the key the new values name).
    pub async fn reseal_all<E>(
        &self,
        key_id: &str,
        mut reseal: impl FnMut(&SealedValue) -> Result<Option<String>, E>,
    ) -> Result<Result<usize, E>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        // A write first, so SQLite takes its write lock now rather than fail
        // to upgrade a read transaction after another writer went first.
        sqlx::query("UPDATE users SET name = name WHERE 1 = 0")
            .execute(&mut *tx)
            .await
            .map_err(q("lock for re-sealing"))?;
        let values = all_in(&mut tx).await?;
        let mut n = 0;
        for v in &values {
            let new = match reseal(v) {
                Ok(Some(new)) => new,
                Ok(None) => continue,
                Err(e) => return Ok(Err(e)),
            };
            let query = match &v.at {
                SealedRef::Credential {
                    owner_id, provider, ..
                } => sqlx::query(
                    "UPDATE credentials SET sealed = $1, key_id = $2 \
                     WHERE owner_id = $3 AND provider = $4 AND sealed = $5",
                )
                .bind(new)
                .bind(key_id.to_owned())
                .bind(owner_id.clone())
                .bind(provider.clone())
                .bind(v.sealed.clone()),
                SealedRef::EgressAccount => sqlx::query(
                    "UPDATE egress_accounts SET password_sealed = $1 \
                     WHERE id = $2 AND password_sealed = $3",
                )
                .bind(new)
                .bind(ACCOUNT_ID)
                .bind(v.sealed.clone()),
                SealedRef::EgressUpstream { user_id } => sqlx::query(
                    "UPDATE egress_user_upstreams SET password_sealed = $1 \
                     WHERE user_id = $2 AND password_sealed = $3",
                )
                .bind(new)
                .bind(user_id.clone())
                .bind(v.sealed.clone()),
            };
            let done = query
                .execute(&mut *tx)
                .await
                .map_err(q("re-seal a value"))?;
            n += usize::try_from(done.rows_affected()).unwrap_or(0);
        }
        tx.commit().await.map_err(q("commit the re-sealing"))?;
        Ok(Ok(n))
    }
}
