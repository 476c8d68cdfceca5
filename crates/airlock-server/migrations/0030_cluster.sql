-- Many hosts (docs/cluster.md): every `airlock node` registers here and
-- renews its lease every few seconds; replicas place sandboxes on nodes whose
-- lease is current. Portable between SQLite and PostgreSQL (BIGINT
-- milliseconds and 0/1 flags).
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    -- Where replicas reach the node's API (host:port).
    address TEXT NOT NULL,
    backend TEXT NOT NULL,
    image_build_id TEXT NOT NULL,
    cpus BIGINT NOT NULL,
    memory_total BIGINT NOT NULL,
    memory_free BIGINT NOT NULL,
    disk_free BIGINT NOT NULL,
    -- Sandboxes the node holds resources for, as it last said.
    running BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL,
    -- 1: no new placement; its sandboxes run to their end.
    draining BIGINT NOT NULL DEFAULT 0
);

-- The node a sandbox was placed on; NULL for one made by an in-process node
-- (a single host) or not yet placed.
ALTER TABLE sandboxes ADD COLUMN node TEXT;
CREATE INDEX sandboxes_node ON sandboxes (node);
