-- Secrets; the same as migrations/sqlite/0007_secrets.sql in PostgreSQL's types.
CREATE TABLE secrets (
    org TEXT NOT NULL REFERENCES orgs(name) ON DELETE CASCADE,
    name TEXT COLLATE "C" NOT NULL,
    ciphertext BYTEA NOT NULL,
    nonce BYTEA NOT NULL,
    key_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (org, name)
);

CREATE INDEX secrets_by_key ON secrets(key_id);
