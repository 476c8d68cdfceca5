-- Several workspaces per user (docs/credentials.md, "Several workspaces").
-- A workspace is known by a name its user gives at create ("default" when
-- none is given), unique among the user's live workspaces; its home volume
-- is found by that name, so it outlives every rebuild of the sandbox.
-- Portable between SQLite and PostgreSQL.

DROP INDEX sandboxes_one_workspace;

-- The name each workspace sandbox was made under. `live` is 1 while the
-- name is taken and NULL once its sandbox ended (NULLs never collide in a
-- unique index, so ended sandboxes keep their row).
CREATE TABLE workspace_names (
    sandbox_id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    name TEXT NOT NULL,
    live BIGINT,
    created_at BIGINT NOT NULL
);

CREATE UNIQUE INDEX workspace_names_live ON workspace_names (owner_id, name, live);

INSERT INTO workspace_names (sandbox_id, owner_id, name, live, created_at)
    SELECT id, owner_id, 'default', 1, created_at FROM sandboxes
    WHERE kind = 'workspace' AND state IN ('provisioning', 'booting', 'ready', 'stopping');

-- The workspace a login delivers to (absent: "default").
CREATE TABLE login_targets (
    login_id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL
);

-- Which named workspaces hold a provider's files: written at each delivery,
-- read by the health check (it delivers again only where the files belong)
-- and by revocation (`revoking`: to be removed when that workspace next runs).
CREATE TABLE credential_placements (
    owner_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    workspace TEXT NOT NULL,
    state TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (owner_id, provider, workspace)
);

INSERT INTO credential_placements (owner_id, provider, workspace, state, at)
    SELECT owner_id, provider, 'default', 'placed', delivered_at FROM credentials
    WHERE delivered_at IS NOT NULL;

-- Bumped by every revocation: a delivery that read the record before it
-- and wrote after it sees the number moved and takes its files back out.
CREATE TABLE credential_generations (
    owner_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    generation BIGINT NOT NULL,
    PRIMARY KEY (owner_id, provider)
);
