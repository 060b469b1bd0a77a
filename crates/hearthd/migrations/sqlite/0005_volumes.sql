-- Volumes: named extra disks, files <data_dir>/volumes/<id>.ext4. A volume outlives the VM it
-- is attached to: deleting the VM sets vm_id (and path) back to NULL, never the volume. It is
-- attached to one VM at most, mounted there at `path` (unique within the VM); `formatted` is 1
-- once its ext4 filesystem was made (at its first attach).
CREATE TABLE volumes (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    size_mib INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    formatted INTEGER NOT NULL DEFAULT 0,
    vm_id TEXT REFERENCES vms(id) ON DELETE SET NULL,
    path TEXT,
    attached_at TEXT
);

CREATE INDEX volumes_by_vm ON volumes(vm_id);
CREATE UNIQUE INDEX volumes_vm_path ON volumes(vm_id, path);
