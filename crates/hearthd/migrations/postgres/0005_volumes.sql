-- Volumes; the same as migrations/sqlite/0004_volumes.sql in PostgreSQL's types.
CREATE TABLE volumes (
    id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    size_mib BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    formatted BIGINT NOT NULL DEFAULT 0,
    vm_id TEXT COLLATE "C" REFERENCES vms(id) ON DELETE SET NULL,
    path TEXT COLLATE "C",
    attached_at TEXT
);

CREATE INDEX volumes_by_vm ON volumes(vm_id);
CREATE UNIQUE INDEX volumes_vm_path ON volumes(vm_id, path);
