//! Backups of VMs' root disks: one row per complete backup file (see the migration), each
//! created, deleted and restored with an event of its VM in the same transaction.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, VmState, insert_event, now, state_text};

/// A backup as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRecord {
    pub id: String,
    pub vm_id: String,
    pub created_at: String,
    /// Who asked for it (`Caller::principal`).
    pub created_by: String,
    /// The VM's shape when it was made.
    pub cpus: u32,
    pub memory_mib: u64,
    pub rootfs_mib: u64,
    /// What its file takes on disk (allocated, so a sparse or shared file counts what it holds).
    pub size_bytes: u64,
}

const COLUMNS: &str = "id, vm_id, created_at, created_by, cpus, memory_mib, rootfs_mib, size_bytes";

fn from_row(r: &AnyRow) -> Result<BackupRecord, StoreError> {
    let number = |column: &str| -> Result<u64, StoreError> {
        let v: i64 = r.try_get(column)?;
        Ok(u64::try_from(v).unwrap_or(0))
    };
    Ok(BackupRecord {
        id: r.try_get("id")?,
        vm_id: r.try_get("vm_id")?,
        created_at: r.try_get("created_at")?,
        created_by: r.try_get("created_by")?,
        cpus: u32::try_from(number("cpus")?).unwrap_or(u32::MAX),
        memory_mib: number("memory_mib")?,
        rootfs_mib: number("rootfs_mib")?,
        size_bytes: number("size_bytes")?,
    })
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Records a backup whose file is complete, with event `backup_created` of its VM.
    pub async fn insert_backup(&self, b: &BackupRecord) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        sqlx::query(&format!(
            "INSERT INTO backups ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&b.id)
        .bind(&b.vm_id)
        .bind(&b.created_at)
        .bind(&b.created_by)
        .bind(i64::from(b.cpus))
        .bind(int(b.memory_mib))
        .bind(int(b.rootfs_mib))
        .bind(int(b.size_bytes))
        .execute(&mut *tx)
        .await?;
        let message = format!("backup {} by {}", b.id, b.created_by);
        insert_event(
            &mut tx,
            &b.vm_id,
            "backup_created",
            None,
            None,
            Some(&message),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The backups of VM `vm_id`, oldest first.
    pub async fn list_backups(&self, vm_id: &str) -> Result<Vec<BackupRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM backups WHERE vm_id = $1 ORDER BY created_at, id"
        ))
        .bind(vm_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(from_row)
        .collect()
    }

    /// Every backup's (VM id, backup id): what the files on disk must match.
    pub async fn all_backups(&self) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query("SELECT vm_id, id FROM backups")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("vm_id")?, r.try_get("id")?)))
            .collect()
    }

    /// Backup `id` of VM `vm_id` (`vm` names it in the error): a backup of another VM is not
    /// found.
    pub async fn get_backup(
        &self,
        vm_id: &str,
        vm: &str,
        id: &str,
    ) -> Result<BackupRecord, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM backups WHERE vm_id = $1 AND id = $2"
        ))
        .bind(vm_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => from_row(&r),
            None => Err(StoreError::NoBackup {
                vm: vm.to_owned(),
                id: id.to_owned(),
            }),
        }
    }

    /// Forgets backup `id` of VM `vm_id`, with event `backup_deleted` (its file goes after).
    pub async fn delete_backup(&self, vm_id: &str, vm: &str, id: &str) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let done = sqlx::query("DELETE FROM backups WHERE vm_id = $1 AND id = $2")
            .bind(vm_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NoBackup {
                vm: vm.to_owned(),
                id: id.to_owned(),
            });
        }
        insert_event(&mut tx, vm_id, "backup_deleted", None, None, Some(id)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records that stopped VM `vm_id` now has backup `b`'s disk: its `rootfs_mib`, and event
    /// `restored`. Fails with [`StoreError::NotFound`] when the VM is gone or no longer stopped.
    pub async fn restored(&self, vm_id: &str, b: &BackupRecord) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let done = sqlx::query(
            "UPDATE vms SET rootfs_mib = $1, updated_at = $2 WHERE id = $3 AND state = $4",
        )
        .bind(int(b.rootfs_mib))
        .bind(now())
        .bind(vm_id)
        .bind(state_text(VmState::Stopped))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(vm_id.to_owned()));
        }
        let message = format!(
            "root disk restored from backup {} of {}",
            b.id, b.created_at
        );
        insert_event(&mut tx, vm_id, "restored", None, None, Some(&message)).await?;
        tx.commit().await?;
        Ok(())
    }
}
