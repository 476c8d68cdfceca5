-- Warm pools (app/pool.rs): booted, never-used sandboxes are owned by this
-- reserved user until a claim hands one to a real user. It has no token and
-- is disabled, so nobody can act as it; its name cannot be a user's name
-- ('@' is not allowed in one). Portable between SQLite and PostgreSQL.
INSERT INTO users (id, name, token_hash, created_at, admin, disabled_at)
    VALUES ('pool', '@pool', NULL, 0, 0, 0);
