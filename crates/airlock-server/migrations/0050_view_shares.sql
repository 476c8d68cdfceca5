-- View shares (app/shares.rs): a link a sandbox's owner hands to a second
-- person to watch its desktop, read-only unless the owner grants input. Only
-- the secret's SHA-256 is kept; revoking deletes the row.
CREATE TABLE view_shares (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    sandbox_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    input BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX view_shares_sandbox ON view_shares (sandbox_id, expires_at);
