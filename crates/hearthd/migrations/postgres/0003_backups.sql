-- Backups; the same as migrations/sqlite/0003_backups.sql in PostgreSQL's types.
CREATE TABLE backups (
    id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    vm_id TEXT COLLATE "C" NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    cpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    rootfs_mib BIGINT NOT NULL,
    size_bytes BIGINT NOT NULL
);

CREATE INDEX backups_by_vm ON backups(vm_id);
