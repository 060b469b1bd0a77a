-- Networking: each VM's /30 (its index in network.cidr; NULL without networking; unique, so no
-- address is handed out twice, and gone with the row), its egress policy and instance metadata
-- (JSON of the store's own types), and private networks with their members.
ALTER TABLE vms ADD COLUMN net_index INTEGER;
ALTER TABLE vms ADD COLUMN egress TEXT;
ALTER TABLE vms ADD COLUMN metadata TEXT;
CREATE UNIQUE INDEX vms_net_index ON vms(net_index);

CREATE TABLE networks (
    name TEXT PRIMARY KEY NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE network_members (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE,
    vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    PRIMARY KEY (network, vm_id)
);

CREATE INDEX network_members_by_vm ON network_members(vm_id);
