-- Accounts: an admin role, disabling a user, and removal that waits for the
-- user's sandboxes to end. Portable between SQLite and PostgreSQL: BIGINT
-- flags (0/1) and unix milliseconds.

-- Admin actions over HTTP (the egress account, other users' upstreams, egress
-- settings) need an admin's token; no user is admin by default.
ALTER TABLE users ADD COLUMN admin BIGINT NOT NULL DEFAULT 0;

-- A disabled user's token gets 401; the row and its data stay.
ALTER TABLE users ADD COLUMN disabled_at BIGINT;

-- Set by `airlock user remove`: the user is disabled, its sandboxes are told
-- to stop, and the row (with its logins, credentials and egress rows) goes
-- once no sandbox of it holds host resources.
ALTER TABLE users ADD COLUMN removing_at BIGINT;
