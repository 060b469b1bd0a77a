-- Networking; the same as migrations/sqlite/0002_network.sql in PostgreSQL's types.
ALTER TABLE vms ADD COLUMN net_index BIGINT;
ALTER TABLE vms ADD COLUMN egress TEXT;
ALTER TABLE vms ADD COLUMN metadata TEXT;
CREATE UNIQUE INDEX vms_net_index ON vms(net_index);

CREATE TABLE networks (
    name TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE network_members (
    network TEXT COLLATE "C" NOT NULL REFERENCES networks(name) ON DELETE CASCADE,
    vm_id TEXT COLLATE "C" NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    PRIMARY KEY (network, vm_id)
);

CREATE INDEX network_members_by_vm ON network_members(vm_id);
