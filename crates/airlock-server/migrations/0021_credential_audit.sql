-- Keeping the CLIs signed in (docs/credentials.md): the audit trail of each
-- user's credential events, the last health check of each stored record,
-- and revocations whose files are still to be removed from a workspace.
-- Portable between SQLite and PostgreSQL: TEXT ids, BIGINT unix milliseconds.
-- No secret is ever written to these tables.

CREATE TABLE credential_events (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    provider TEXT NOT NULL,
    workspace_sandbox_id TEXT,
    login_id TEXT,
    detail TEXT
);

CREATE INDEX credential_events_owner ON credential_events (owner_id, at, id);

-- One row per user and provider, beside its `credentials` record.
CREATE TABLE credential_health (
    owner_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at BIGINT,
    checked_at BIGINT NOT NULL,
    workspace_sandbox_id TEXT,
    detail TEXT,
    version BIGINT NOT NULL,
    PRIMARY KEY (owner_id, provider)
);

-- Revoked while no workspace could be cleaned: the next check of a ready
-- workspace of the user removes the provider's files, then the row.
CREATE TABLE credential_revocations (
    owner_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    revoked_at BIGINT NOT NULL,
    PRIMARY KEY (owner_id, provider)
);
