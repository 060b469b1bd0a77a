//! Volumes: one row per volume whose file is complete (see the migration). A volume is attached
//! to one VM at most; attaching and detaching are events of that VM, in the same transaction.
//! Deleting a VM detaches its volumes (`ON DELETE SET NULL`), never deletes them.

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{Backend, Store, StoreError, VmState, insert_event, state_text};

/// A volume as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub size_mib: u64,
    pub created_at: String,
    /// Its ext4 filesystem was made.
    pub formatted: bool,
    /// The VM it is attached to, by id and (read from that VM's row) by name.
    pub vm_id: Option<String>,
    pub vm_name: Option<String>,
    /// Where that VM mounts it.
    pub path: Option<String>,
    /// The organization it belongs to.
    pub org: String,
}

const SELECT: &str = "SELECT v.id, v.name, v.size_mib, v.created_at, v.formatted, v.vm_id, v.path, v.org, m.name AS vm_name FROM volumes v LEFT JOIN vms m ON m.id = v.vm_id";

fn from_row(r: &AnyRow) -> Result<VolumeRecord, StoreError> {
    let size: i64 = r.try_get("size_mib")?;
    let formatted: i64 = r.try_get("formatted")?;
    Ok(VolumeRecord {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        size_mib: u64::try_from(size).unwrap_or(0),
        created_at: r.try_get("created_at")?,
        formatted: formatted != 0,
        vm_id: r.try_get("vm_id")?,
        vm_name: r.try_get("vm_name")?,
        path: r.try_get("path")?,
        org: r.try_get("org")?,
    })
}

/// Volume `name`, read (and, in a writing transaction on PostgreSQL, locked) in `tx`.
async fn locked(
    backend: Backend,
    tx: &mut Transaction<'_, Any>,
    name: &str,
) -> Result<VolumeRecord, StoreError> {
    // The lock is on the volume's row only (`OF v`): a LEFT JOIN's nullable side cannot be
    // locked in PostgreSQL.
    let lock = match backend {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE OF v",
    };
    let row = sqlx::query(&format!("{SELECT} WHERE v.name = $1{lock}"))
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NoVolume(name.to_owned()))?;
    from_row(&row)
}

/// The volume's VM, for an error naming it.
fn holder(v: &VolumeRecord) -> StoreError {
    StoreError::VolumeAttached {
        volume: v.name.clone(),
        vm: v
            .vm_name
            .clone()
            .or_else(|| v.vm_id.clone())
            .unwrap_or_default(),
    }
}

/// Attaches volume `name` at `path` to VM `vm_id` (named `vm` in errors) inside `tx`, with
/// event `volume_attached`. Fails when the volume does not exist, is attached to another VM,
/// or the VM has another volume at `path`. Attaching it again to its own VM moves its path.
pub(super) async fn attach(
    backend: Backend,
    tx: &mut Transaction<'_, Any>,
    vm_id: &str,
    vm: &str,
    name: &str,
    path: &str,
) -> Result<(), StoreError> {
    let volume = locked(backend, tx, name).await?;
    if volume.vm_id.as_deref().is_some_and(|id| id != vm_id) {
        return Err(holder(&volume));
    }
    let taken = sqlx::query("SELECT name FROM volumes WHERE vm_id = $1 AND path = $2 AND id <> $3")
        .bind(vm_id)
        .bind(path)
        .bind(&volume.id)
        .fetch_optional(&mut **tx)
        .await?;
    if taken.is_some() {
        return Err(StoreError::VolumePathTaken {
            vm: vm.to_owned(),
            path: path.to_owned(),
        });
    }
    sqlx::query("UPDATE volumes SET vm_id = $1, path = $2, attached_at = $3 WHERE id = $4")
        .bind(vm_id)
        .bind(path)
        .bind(super::now())
        .bind(&volume.id)
        .execute(&mut **tx)
        .await?;
    let message = format!("volume {name} attached at {path}");
    insert_event(tx, vm_id, "volume_attached", None, None, Some(&message)).await?;
    Ok(())
}

impl Store {
    /// Records a volume whose file is complete. Fails with [`StoreError::VolumeTaken`] when the
    /// name is taken.
    pub async fn insert_volume(&self, v: &VolumeRecord) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO volumes (id, name, size_mib, created_at, formatted, org) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&v.id)
        .bind(&v.name)
        .bind(i64::try_from(v.size_mib).unwrap_or(i64::MAX))
        .bind(&v.created_at)
        .bind(i64::from(v.formatted))
        .bind(&v.org)
        .execute(&self.pool)
        .await;
        match inserted {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::VolumeTaken(v.name.clone()))
            }
            other => other.map(drop).map_err(Into::into),
        }
    }

    /// Every volume, by name.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        sqlx::query(&format!("{SELECT} ORDER BY v.name"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    pub async fn get_volume(&self, name: &str) -> Result<VolumeRecord, StoreError> {
        let row = sqlx::query(&format!("{SELECT} WHERE v.name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NoVolume(name.to_owned()))?;
        from_row(&row)
    }

    /// The volumes attached to VM `vm_id`, in the order they were attached.
    pub async fn vm_volumes(&self, vm_id: &str) -> Result<Vec<VolumeRecord>, StoreError> {
        sqlx::query(&format!(
            "{SELECT} WHERE v.vm_id = $1 ORDER BY v.attached_at, v.name"
        ))
        .bind(vm_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(from_row)
        .collect()
    }

    /// Records that volume `id` holds its ext4 filesystem.
    pub async fn mark_formatted(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE volumes SET formatted = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets volume `name` (its file goes after). Fails with
    /// [`StoreError::VolumeAttached`] while it is attached to a VM.
    pub async fn delete_volume(&self, name: &str) -> Result<VolumeRecord, StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let volume = locked(self.backend, &mut tx, name).await?;
        if volume.vm_id.is_some() {
            return Err(holder(&volume));
        }
        sqlx::query("DELETE FROM volumes WHERE id = $1")
            .bind(&volume.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(volume)
    }

    /// Attaches volume `name` at `path` to stopped VM `vm_id` (see [`attach`]). Fails with
    /// [`StoreError::NotFound`] when the VM is gone or no longer stopped.
    pub async fn attach_volume(
        &self,
        vm_id: &str,
        name: &str,
        path: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let vm = stopped_vm(self.backend, &mut tx, vm_id).await?;
        attach(self.backend, &mut tx, vm_id, &vm, name, path).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Detaches volume `name` from stopped VM `vm_id`, with event `volume_detached`. Fails
    /// with [`StoreError::VolumeNotAttached`] when it is not attached to that VM, and
    /// [`StoreError::NotFound`] when the VM is gone or no longer stopped.
    pub async fn detach_volume(&self, vm_id: &str, name: &str) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let vm = stopped_vm(self.backend, &mut tx, vm_id).await?;
        let volume = locked(self.backend, &mut tx, name).await?;
        if volume.vm_id.as_deref() != Some(vm_id) {
            return Err(StoreError::VolumeNotAttached {
                volume: name.to_owned(),
                vm,
            });
        }
        sqlx::query(
            "UPDATE volumes SET vm_id = NULL, path = NULL, attached_at = NULL WHERE id = $1",
        )
        .bind(&volume.id)
        .execute(&mut *tx)
        .await?;
        let message = format!(
            "volume {name} detached from {}",
            volume.path.as_deref().unwrap_or("?")
        );
        insert_event(
            &mut tx,
            vm_id,
            "volume_detached",
            None,
            None,
            Some(&message),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every volume's id: what the files on disk must match.
    pub async fn all_volume_ids(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query("SELECT id FROM volumes")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok(r.try_get("id")?))
            .collect()
    }
}

/// The name of VM `vm_id`, locked in `tx`, when it is stopped; else [`StoreError::NotFound`].
async fn stopped_vm(
    backend: Backend,
    tx: &mut Transaction<'_, Any>,
    vm_id: &str,
) -> Result<String, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT name FROM vms WHERE id = $1 AND state = $2{}",
        backend.lock_clause()
    ))
    .bind(vm_id)
    .bind(state_text(VmState::Stopped))
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| StoreError::NotFound(vm_id.to_owned()))?;
    Ok(row.try_get("name")?)
}
