//! The node registry (docs/cluster.md): each `airlock node` upserts its row
//! and renews its lease; a sandbox's row names the node it was placed on.
//! Placement itself is a pure function (`cluster::placement`); this module
//! only records.

use super::{q, Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::Row;

/// One registered node, as it last reported itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeRow {
    pub name: String,
    /// Where replicas reach its API (`host:port`).
    pub address: String,
    pub backend: String,
    pub image_build_id: String,
    pub cpus: u32,
    pub memory_total: u64,
    pub memory_free: u64,
    pub disk_free: u64,
    /// Sandboxes it holds resources for.
    pub running: u32,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub lease_expires_at: i64,
    pub draining: bool,
}

impl NodeRow {
    /// Whether its lease is current at `now` (ms).
    pub fn alive(&self, now: i64) -> bool {
        self.lease_expires_at > now
    }
}

const NODE_COLUMNS: &str =
    "name, address, backend, image_build_id, cpus, memory_total, memory_free, \
     disk_free, running, started_at, heartbeat_at, lease_expires_at, draining";

fn node_from_row(row: &AnyRow) -> Result<NodeRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let n = |col: &str| -> Result<i64, StoreError> { row.try_get::<i64, _>(col).map_err(get) };
    let draining = n("draining")?;
    Ok(NodeRow {
        name: row.try_get("name").map_err(get)?,
        address: row.try_get("address").map_err(get)?,
        backend: row.try_get("backend").map_err(get)?,
        image_build_id: row.try_get("image_build_id").map_err(get)?,
        cpus: u32::try_from(n("cpus")?).unwrap_or(0),
        memory_total: u64::try_from(n("memory_total")?).unwrap_or(0),
        memory_free: u64::try_from(n("memory_free")?).unwrap_or(0),
        disk_free: u64::try_from(n("disk_free")?).unwrap_or(0),
        running: u32::try_from(n("running")?).unwrap_or(0),
        started_at: n("started_at")?,
        heartbeat_at: n("heartbeat_at")?,
        lease_expires_at: n("lease_expires_at")?,
        draining: draining != 0,
    })
}

fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The sandbox states a node must keep running.
pub const WANTED_STATES: &str = "'provisioning', 'booting', 'ready', 'pooled'";

impl Store {
    /// A node's registration or heartbeat: its row as it reports it now,
    /// with a lease until `lease_expires_at`. `draining` is the operator's
    /// and is kept as it is.
    pub async fn upsert_node(&self, n: &NodeRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nodes (name, address, backend, image_build_id, cpus, memory_total, memory_free, \
             disk_free, running, started_at, heartbeat_at, lease_expires_at, draining) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 0) \
             ON CONFLICT (name) DO UPDATE SET address = $2, backend = $3, image_build_id = $4, cpus = $5, \
             memory_total = $6, memory_free = $7, disk_free = $8, running = $9, started_at = $10, \
             heartbeat_at = $11, lease_expires_at = $12",
        )
        .bind(&n.name)
        .bind(&n.address)
        .bind(&n.backend)
        .bind(&n.image_build_id)
        .bind(i64::from(n.cpus))
        .bind(big(n.memory_total))
        .bind(big(n.memory_free))
        .bind(big(n.disk_free))
        .bind(i64::from(n.running))
        .bind(n.started_at)
        .bind(n.heartbeat_at)
        .bind(n.lease_expires_at)
        .execute(&self.pool)
        .await
        .map_err(q("register node"))?;
        Ok(())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name");
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list nodes"))?;
        rows.iter().map(node_from_row).collect()
    }

    pub async fn node(&self, name: &str) -> Result<Option<NodeRow>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = $1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("read node"))?;
        row.as_ref().map(node_from_row).transpose()
    }

    /// Stop (or resume) placement on a node; false when there is no such node.
    pub async fn set_node_draining(&self, name: &str, draining: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE nodes SET draining = $1 WHERE name = $2")
            .bind(i64::from(draining))
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(q("drain node"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Place a sandbox on `node` unless it was placed already; the node it
    /// is on either way.
    /// Only a sandbox still `provisioning` is placed, and never one whose
    /// placement was withdrawn ([`Store::withdraw_placement`]).
    pub async fn place_sandbox(&self, id: &str, node: &str) -> Result<Option<String>, StoreError> {
        sqlx::query(
            "UPDATE sandboxes SET node = $1 WHERE id = $2 AND node IS NULL AND state = 'provisioning'",
        )
            .bind(node)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("place sandbox"))?;
        self.node_of(id).await
    }

    /// A sandbox torn down before it was placed is never placed after: its
    /// node is set to the empty name (no node has it). The node it is on
    /// now, if a placement won the race.
    pub async fn withdraw_placement(&self, id: &str) -> Result<Option<String>, StoreError> {
        sqlx::query("UPDATE sandboxes SET node = '' WHERE id = $1 AND node IS NULL")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("withdraw placement"))?;
        self.node_of(id).await
    }

    /// The node a sandbox was placed on (`""`: withdrawn, on none).
    pub async fn node_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT node FROM sandboxes WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("read sandbox node"))?;
        match row {
            Some(r) => r
                .try_get::<Option<String>, _>("node")
                .map_err(|e| StoreError::Corrupt(e.to_string())),
            None => Ok(None),
        }
    }

    /// Ids of the sandboxes on `node` that it should keep running.
    pub async fn wanted_on(&self, node: &str) -> Result<Vec<String>, StoreError> {
        let sql =
            format!("SELECT id FROM sandboxes WHERE node = $1 AND state IN ({WANTED_STATES})");
        let rows = sqlx::query(&sql)
            .bind(node)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list a node's sandboxes"))?;
        rows.iter()
            .map(|r| {
                r.try_get("id")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// Live sandboxes (wanted, or still holding a lease) per node.
    pub async fn load_by_node(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let sql = format!(
            "SELECT node, COUNT(*) AS n FROM sandboxes WHERE node IS NOT NULL \
             AND (state IN ({WANTED_STATES}) OR lease_index IS NOT NULL) GROUP BY node"
        );
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(q("count sandboxes per node"))?;
        rows.iter()
            .map(|r| {
                let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
                let n: i64 = r.try_get("n").map_err(get)?;
                Ok((
                    r.try_get("node").map_err(get)?,
                    u32::try_from(n).unwrap_or(0),
                ))
            })
            .collect()
    }

    /// Sandboxes in `provisioning` or `booting` since before `before` (ms):
    /// nobody drives them any more (the replica that did went away).
    pub async fn abandoned(&self, before: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM sandboxes WHERE state IN ('provisioning', 'booting') AND updated_at < $1",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await
        .map_err(q("find abandoned sandboxes"))?;
        rows.iter()
            .map(|r| {
                r.try_get("id")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// Try to become the one actor for `key` (the reaper, the recovery of
    /// lost nodes) among every process on this database. PostgreSQL: a
    /// session advisory lock on a connection of its own, held until the
    /// [`Leadership`] is dropped or its connection dies. SQLite: one process
    /// owns the file (the data dir lock), so it always leads.
    ///
    /// `retry` is the connection of an earlier try that did not win: it is
    /// asked again rather than a new one opened each time.
    pub async fn try_lead(&self, key: i64) -> Result<Option<Leadership>, StoreError> {
        Ok(self.contend(key, None).await?.filter(|l| l.leading))
    }

    /// One try for `key` on `conn` (or a new connection): the connection,
    /// leading or not, so a follower keeps asking on the same one.
    pub async fn contend(
        &self,
        key: i64,
        conn: Option<Leadership>,
    ) -> Result<Option<Leadership>, StoreError> {
        if !self.postgres {
            return Ok(Some(Leadership {
                conn: None,
                leading: true,
            }));
        }
        let mut conn = match conn.and_then(|l| l.conn) {
            Some(c) => c,
            None => {
                let mut c = self
                    .pool
                    .acquire()
                    .await
                    .map_err(q("connect for leadership"))?
                    .detach();
                // A leader whose host vanishes must let go within seconds,
                // not when the server's TCP keepalive (hours) notices.
                for set in [
                    "SET tcp_keepalives_idle = 5",
                    "SET tcp_keepalives_interval = 2",
                    "SET tcp_keepalives_count = 3",
                ] {
                    sqlx::query(set)
                        .execute(&mut c)
                        .await
                        .map_err(q("set keepalives"))?;
                }
                c
            }
        };
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .map_err(q("take advisory lock"))?;
        Ok(Some(Leadership {
            conn: Some(conn),
            leading: got,
        }))
    }

    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// The node each of `ids` was placed on, for those placed at all (one
    /// query per 500 ids, so a long list stays within the bind limits).
    pub async fn nodes_of(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let mut placed = std::collections::HashMap::new();
        for chunk in ids.chunks(500) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT id, node FROM sandboxes WHERE node IS NOT NULL AND node <> '' AND id IN ({})",
                marks.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(q("read sandboxes' nodes"))?;
            for r in &rows {
                let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
                placed.insert(
                    r.try_get::<String, _>("id").map_err(get)?,
                    r.try_get::<String, _>("node").map_err(get)?,
                );
            }
        }
        Ok(placed)
    }
}

/// A try for the one actor's lock; see [`Store::try_lead`].
#[derive(Debug)]
pub struct Leadership {
    conn: Option<sqlx::AnyConnection>,
    leading: bool,
}

impl Leadership {
    /// Whether this process holds the lock.
    pub fn leading(&self) -> bool {
        self.leading
    }

    /// Whether the lock is still ours: its connection still answers, within
    /// a few seconds.
    pub async fn holds(&mut self) -> bool {
        use sqlx::Connection;
        match &mut self.conn {
            None => self.leading,
            Some(conn) => {
                self.leading
                    && matches!(
                        tokio::time::timeout(std::time::Duration::from_secs(3), conn.ping()).await,
                        Ok(Ok(()))
                    )
            }
        }
    }
}

/// The channel on which a process says a sandbox is going away, so that
/// every replica closes the viewers it serves for it.
const STOPPING_CHANNEL: &str = "airlock_stopping";

impl Store {
    /// Tell every process on this database that sandbox `id` is going away
    /// (PostgreSQL `NOTIFY`; nothing to tell on SQLite, where one process
    /// owns the file).
    pub async fn notify_stopping(&self, id: &str) -> Result<(), StoreError> {
        if !self.postgres {
            return Ok(());
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(STOPPING_CHANNEL)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("notify stopping"))?;
        Ok(())
    }

    /// Sandboxes other processes said are going away, as they say it, until
    /// the connection fails (the caller listens again). `None` on SQLite.
    pub async fn listen_stopping(&self) -> Result<Option<sqlx::postgres::PgListener>, StoreError> {
        if !self.postgres {
            return Ok(None);
        }
        let mut listener = sqlx::postgres::PgListener::connect(&self.url)
            .await
            .map_err(q("connect to listen"))?;
        listener
            .listen(STOPPING_CHANNEL)
            .await
            .map_err(q("listen for stopping sandboxes"))?;
        Ok(Some(listener))
    }
}

/// A user's lock held across processes: a transaction that took
/// `pg_advisory_xact_lock` for the user, ended (rolled back, releasing the
/// lock) when this is dropped.
#[derive(Debug)]
pub struct UserLock {
    _tx: sqlx::Transaction<'static, sqlx::Any>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The advisory lock key of a user: the first 8 bytes of a SHA-256 of a
/// fixed prefix and the id (other keys, like the leader's, are constants).
fn user_key(user_id: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("airlock-user:{user_id}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

impl Store {
    /// Hold `user_id`'s lock among every process on this database until the
    /// returned guard is dropped: admissions of one user are one at a time
    /// across replicas. `None` on SQLite (one process; its own lock serves).
    pub async fn lock_user(&self, user_id: &str) -> Result<Option<UserLock>, StoreError> {
        if !self.postgres {
            return Ok(None);
        }
        // Each held lock keeps a connection; the admission under it needs
        // another for its counts and insert. Half the pool at most, so the
        // holders never starve their own queries.
        let slot = self
            .lock_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Corrupt("the user-lock slots are closed".into()))?;
        let mut tx = self.pool.begin().await.map_err(q("begin user lock"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(user_key(user_id))
            .execute(&mut *tx)
            .await
            .map_err(q("take user lock"))?;
        Ok(Some(UserLock {
            _tx: tx,
            _slot: Some(slot),
        }))
    }
}

impl Store {
    /// A replica's registration or heartbeat.
    pub async fn renew_replica(
        &self,
        id: &str,
        started_at: i64,
        now: i64,
        lease_expires_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replicas (id, started_at, heartbeat_at, lease_expires_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = $3, lease_expires_at = $4",
        )
        .bind(id)
        .bind(started_at)
        .bind(now)
        .bind(lease_expires_at)
        .execute(&self.pool)
        .await
        .map_err(q("renew replica"))?;
        Ok(())
    }

    /// Record that replica `driver` drives login `id`.
    pub async fn set_login_driver(&self, id: &str, driver: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE logins SET driver = $1 WHERE id = $2")
            .bind(driver)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("record login driver"))?;
        Ok(())
    }

    /// Logins under way (`states`) whose driver is gone: its replica's lease
    /// expired before `now`, or none was recorded and the login is older
    /// than `unclaimed_before`. Each is handed to `to` by compare-and-set;
    /// the ids this replica now drives.
    pub async fn take_orphaned_logins(
        &self,
        states: &[&str],
        now: i64,
        unclaimed_before: i64,
        to: &str,
    ) -> Result<Vec<String>, StoreError> {
        let list = states
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT id, driver FROM logins WHERE state IN ({list}) AND \
             ((driver IS NULL AND created_at < $1) OR (driver IS NOT NULL AND driver <> $2 AND \
             driver NOT IN (SELECT id FROM replicas WHERE lease_expires_at > $3)))"
        );
        let rows = sqlx::query(&sql)
            .bind(unclaimed_before)
            .bind(to)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(q("find orphaned logins"))?;
        let mut taken = Vec::new();
        for r in rows {
            let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            let id: String = r.try_get("id").map_err(get)?;
            let old: Option<String> = r.try_get("driver").map_err(get)?;
            let done = sqlx::query(
                "UPDATE logins SET driver = $1 WHERE id = $2 AND \
                 (driver = $3 OR (driver IS NULL AND $3 IS NULL))",
            )
            .bind(to)
            .bind(&id)
            .bind(&old)
            .execute(&self.pool)
            .await
            .map_err(q("take an orphaned login"))?;
            if done.rows_affected() == 1 {
                taken.push(id);
            }
        }
        Ok(taken)
    }
}

impl Store {
    /// Hold the lock on address leases among every process on this database
    /// until the guard is dropped: two replicas never pick the same free
    /// lease. Take it after the process's own lease lock, so at most one
    /// connection per process waits for it. `None` on SQLite.
    pub async fn lock_leases(&self) -> Result<Option<UserLock>, StoreError> {
        if !self.postgres {
            return Ok(None);
        }
        let mut tx = self.pool.begin().await.map_err(q("begin lease lock"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(user_key("@leases"))
            .execute(&mut *tx)
            .await
            .map_err(q("take lease lock"))?;
        Ok(Some(UserLock {
            _tx: tx,
            _slot: None,
        }))
    }
}

impl Store {
    /// Sandboxes on `node` still holding an address lease.
    pub async fn leased_on(&self, node: &str) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query("SELECT id FROM sandboxes WHERE node = $1 AND lease_index IS NOT NULL")
                .bind(node)
                .fetch_all(&self.pool)
                .await
                .map_err(q("list a node's leases"))?;
        rows.iter()
            .map(|r| {
                r.try_get("id")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// Remove a node from the registry; false when there was none.
    pub async fn delete_node(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM nodes WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(q("delete node"))?;
        Ok(done.rows_affected() == 1)
    }
}
