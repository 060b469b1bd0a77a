-- Who made each VM (the principal of its create, or of the export an import came from). VMs
-- made before this column existed were made by the host's operator, the only principal then.
ALTER TABLE vms ADD COLUMN created_by TEXT NOT NULL DEFAULT 'operator';
