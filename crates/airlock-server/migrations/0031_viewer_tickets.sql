-- Viewer tickets (app/tickets.rs) live in the store, so a ticket one replica
-- issued opens a viewer on any other. Only a ticket's SHA-256 is kept.
CREATE TABLE viewer_tickets (
    digest TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX viewer_tickets_user ON viewer_tickets (user_id, expires_at);
