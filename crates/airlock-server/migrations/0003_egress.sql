-- Egress: upstream proxies. Portable between SQLite and PostgreSQL: TEXT ids,
-- BIGINT unix milliseconds. Passwords are vault records, never plaintext.

-- The provider account (one, id 'default'): host, credentials and the port
-- range from which each user gets a port of its own (and so its own exit IP).
CREATE TABLE egress_accounts (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    username TEXT NOT NULL,
    password_sealed TEXT NOT NULL,
    port_min BIGINT NOT NULL,
    port_max BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- A user's port in the account's range: kept across restarts, unique, and
-- gone with the user or the account.
CREATE TABLE egress_user_ports (
    user_id TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    account_id TEXT NOT NULL REFERENCES egress_accounts (id) ON DELETE CASCADE,
    port BIGINT NOT NULL,
    assigned_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX egress_user_ports_port ON egress_user_ports (account_id, port);

-- An explicit upstream for one user; it takes precedence over the account.
CREATE TABLE egress_user_upstreams (
    user_id TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    host TEXT NOT NULL,
    port BIGINT NOT NULL,
    username TEXT NOT NULL,
    password_sealed TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Small settings (echo URL, upstream timeout), by name.
CREATE TABLE egress_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
