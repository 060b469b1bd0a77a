-- VMs and their lifecycle events. The same tables as migrations/sqlite/0001_vms.sql, in
-- PostgreSQL's types: 64-bit integers (the store reads every number as one), and the "C"
-- collation on the text that is sorted or compared, so names and times order byte-wise as in
-- SQLite.
CREATE TABLE vms (
    id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    state TEXT NOT NULL,
    cpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    rootfs_mib BIGINT NOT NULL,
    image TEXT NOT NULL,
    vmm TEXT NOT NULL,
    pid BIGINT,
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT NOT NULL,
    last_error TEXT
);

CREATE TABLE vm_events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vm_id TEXT COLLATE "C" NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    message TEXT
);

CREATE INDEX vm_events_by_vm ON vm_events(vm_id, seq);
