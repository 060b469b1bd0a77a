-- Backups: a stopped VM's root disk at one moment, with the VM's shape then and who made it.
-- A backup belongs to its VM record (it restores only into that VM) and goes with it. A row
-- exists only once its file is complete: the file is written under a temporary name, renamed,
-- and then recorded, so a file without a row is a leftover of a crash (removed at start).
CREATE TABLE backups (
    id TEXT PRIMARY KEY NOT NULL,
    vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    cpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    rootfs_mib INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL
);

CREATE INDEX backups_by_vm ON backups(vm_id);
