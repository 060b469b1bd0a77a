-- VMs and their lifecycle events.
CREATE TABLE vms (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    cpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    rootfs_mib INTEGER NOT NULL,
    image TEXT NOT NULL,
    vmm TEXT NOT NULL,
    pid INTEGER,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_error TEXT
);

CREATE TABLE vm_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    message TEXT
);

CREATE INDEX vm_events_by_vm ON vm_events(vm_id, seq);
