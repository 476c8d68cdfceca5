-- Portable between SQLite and PostgreSQL: TEXT ids, BIGINT unix milliseconds.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES users (id),
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    failure_reason TEXT,
    image_build_id TEXT NOT NULL,
    lease_index BIGINT,
    agent_token TEXT NOT NULL,
    vnc_password TEXT NOT NULL,
    display_width BIGINT NOT NULL,
    display_height BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    ready_at BIGINT,
    last_heartbeat_at BIGINT,
    last_activity_at BIGINT NOT NULL
);

-- A lease is held by at most one sandbox; it is cleared when the sandbox's
-- resources are released.
CREATE UNIQUE INDEX sandboxes_lease ON sandboxes (lease_index) WHERE lease_index IS NOT NULL;

-- One live workspace per user.
CREATE UNIQUE INDEX sandboxes_one_workspace ON sandboxes (owner_id)
    WHERE kind = 'workspace' AND state IN ('provisioning', 'booting', 'ready', 'stopping');

CREATE INDEX sandboxes_owner ON sandboxes (owner_id, created_at);
