-- Secrets at rest: each value encrypted (XChaCha20-Poly1305) under the master key whose id is
-- `key_id`, with a nonce of its own; the associated data binds the organization and name, so
-- a ciphertext moved to another row does not decrypt. Names are unique within an organization.
CREATE TABLE secrets (
    org TEXT NOT NULL REFERENCES orgs(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    ciphertext BLOB NOT NULL,
    nonce BLOB NOT NULL,
    key_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (org, name)
);

CREATE INDEX secrets_by_key ON secrets(key_id);
