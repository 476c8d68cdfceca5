-- Replicas (`airlock up` in a cluster) renew a lease here, and a login names
-- the replica driving it, so the leader can hand the logins of a replica
-- that went away to itself (docs/cluster.md). Portable between SQLite and
-- PostgreSQL.
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL
);
ALTER TABLE logins ADD COLUMN driver TEXT;
