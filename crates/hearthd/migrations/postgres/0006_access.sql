-- Access; the same as migrations/sqlite/0006_access.sql in PostgreSQL's types.
CREATE TABLE users (
    name TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    admin BIGINT NOT NULL DEFAULT 0,
    active_org TEXT,
    created_at TEXT NOT NULL
);

CREATE TABLE orgs (
    name TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE org_members (
    org TEXT NOT NULL REFERENCES orgs(name) ON DELETE CASCADE,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    role TEXT NOT NULL,
    PRIMARY KEY (org, user_name)
);

CREATE INDEX org_members_by_user ON org_members(user_name);

CREATE TABLE ssh_keys (
    fingerprint TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    public_key TEXT NOT NULL,
    comment TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE INDEX ssh_keys_by_user ON ssh_keys(user_name);

CREATE TABLE api_keys (
    id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    org TEXT NOT NULL REFERENCES orgs(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE INDEX api_keys_by_user ON api_keys(user_name);

CREATE TABLE audit (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at TEXT NOT NULL,
    principal TEXT NOT NULL,
    org TEXT,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    decision TEXT NOT NULL,
    result TEXT NOT NULL,
    duration_ms BIGINT NOT NULL,
    request_id TEXT NOT NULL
);

ALTER TABLE vms ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
ALTER TABLE networks ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
ALTER TABLE volumes ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
