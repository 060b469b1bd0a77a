-- Access: users, organizations and their members, SSH public keys, API keys (only the SHA-256
-- of each key is kept), and the audit log. Names are the keys (users and organizations are
-- never renamed). What existed before belonged to the host's operator: it goes to the
-- organization `default`, which hearthd makes at its first start with this schema.
CREATE TABLE users (
    name TEXT PRIMARY KEY NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    active_org TEXT,
    created_at TEXT NOT NULL
);

CREATE TABLE orgs (
    name TEXT PRIMARY KEY NOT NULL,
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
    fingerprint TEXT PRIMARY KEY NOT NULL,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    public_key TEXT NOT NULL,
    comment TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE INDEX ssh_keys_by_user ON ssh_keys(user_name);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY NOT NULL,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    org TEXT NOT NULL REFERENCES orgs(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE INDEX api_keys_by_user ON api_keys(user_name);

CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    principal TEXT NOT NULL,
    org TEXT,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    decision TEXT NOT NULL,
    result TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL
);

ALTER TABLE vms ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
ALTER TABLE networks ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
ALTER TABLE volumes ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
