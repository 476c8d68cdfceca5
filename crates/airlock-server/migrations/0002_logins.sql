-- Login sessions and the sealed credentials they captured. Portable between
-- SQLite and PostgreSQL: TEXT ids, BIGINT unix milliseconds.
CREATE TABLE logins (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES users (id),
    provider TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    login_url TEXT,
    awaiting_code BIGINT NOT NULL DEFAULT 0,
    browser_sandbox_id TEXT,
    workspace_sandbox_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    finished_at BIGINT
);

CREATE INDEX logins_owner ON logins (owner_id, created_at);
CREATE INDEX logins_state ON logins (state);

-- One record per user and provider: a new login replaces it. `sealed` is a
-- vault record bound to (user, "credentials:<provider>", login id).
CREATE TABLE credentials (
    owner_id TEXT NOT NULL REFERENCES users (id),
    provider TEXT NOT NULL,
    login_id TEXT NOT NULL,
    sealed TEXT NOT NULL,
    key_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    delivered_at BIGINT,
    PRIMARY KEY (owner_id, provider)
);
