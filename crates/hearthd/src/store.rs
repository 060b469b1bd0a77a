//! Persistent state: VMs and their events, in SQLite (WAL, busy timeout) through sqlx runtime
//! queries. Only this module knows SQL. Queries stay portable (no SQLite-only syntax beyond the
//! connection pragmas) so a PostgreSQL backend can sit behind the same [`Store`] later.

use std::str::FromStr;
use std::time::Duration;

use hearth_api::{VmEvent, VmState};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}")]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration {version} failed")]
    Migrate {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
    #[error("the database is at schema version {found}, newer than this hearthd knows ({known})")]
    TooNew { found: i64, known: i64 },
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),
    #[error("no VM {0:?}")]
    NotFound(String),
    #[error("VM {name:?} changed state meanwhile: expected {expected}, found {found}")]
    StateChanged {
        name: String,
        expected: VmState,
        found: VmState,
    },
    #[error("database row holds an unknown state {0:?}")]
    BadState(String),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
}

/// Migrations in order; each runs once, in a transaction. Additive only.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../migrations/sqlite/0001_vms.sql"))];

/// A VM as stored: exactly what the API shows, so one type serves both.
pub type VmRecord = hearth_api::Vm;

/// A state change to record: the new state, the event, and what to do with `pid` and
/// `last_error`.
#[derive(Debug, Clone)]
pub struct Transition<'a> {
    pub from: VmState,
    pub to: VmState,
    pub kind: &'a str,
    pub message: Option<&'a str>,
    /// `Some(None)` clears the pid.
    pub pid: Option<Option<u32>>,
    /// `Some(None)` clears the error.
    pub last_error: Option<Option<&'a str>>,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

/// Current time, RFC 3339 with milliseconds, UTC.
pub fn now() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

impl Store {
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            url: url.to_owned(),
            source,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(open_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        let store = Store { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY NOT NULL, applied_at TEXT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let current: i64 =
            sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
                .fetch_one(&self.pool)
                .await?
                .try_get("v")?;
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > known {
            return Err(StoreError::TooNew {
                found: current,
                known,
            });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let err = |source| StoreError::Migrate {
                version: *version,
                source,
            };
            let mut tx = self.pool.begin().await.map_err(err)?;
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(err)?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)")
                .bind(version)
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(err)?;
            tx.commit().await.map_err(err)?;
        }
        Ok(())
    }

    /// Inserts a new VM and its `created` event atomically.
    pub async fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO vms (id, name, state, cpus, memory_mib, rootfs_mib, image, vmm, pid, created_at, updated_at, last_error)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&vm.id)
        .bind(&vm.name)
        .bind(vm.state.as_str())
        .bind(i64::from(vm.cpus))
        .bind(i64::try_from(vm.memory_mib).unwrap_or(i64::MAX))
        .bind(i64::try_from(vm.rootfs_mib).unwrap_or(i64::MAX))
        .bind(&vm.image)
        .bind(&vm.vmm)
        .bind(vm.pid.map(i64::from))
        .bind(&vm.created_at)
        .bind(&vm.updated_at)
        .bind(&vm.last_error)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::NameTaken(vm.name.clone()));
            }
            other => {
                other?;
            }
        }
        insert_event(&mut tx, &vm.id, "created", None, Some(vm.state), None).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM vms ORDER BY created_at, name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(vm_from_row).collect()
    }

    /// Finds a VM by name or id.
    pub async fn get_vm(&self, name_or_id: &str) -> Result<VmRecord, StoreError> {
        // A name wins over an id that happens to look the same.
        let row = sqlx::query(
            "SELECT * FROM vms WHERE name = ? OR id = ? ORDER BY (name = ?) DESC LIMIT 1",
        )
        .bind(name_or_id)
        .bind(name_or_id)
        .bind(name_or_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(name_or_id.to_owned()))?;
        vm_from_row(&row)
    }

    /// Moves a VM from `t.from` to `t.to` and records the event, atomically. Fails with
    /// [`StoreError::StateChanged`] when the VM is no longer in `t.from`.
    pub async fn transition(&self, id: &str, t: &Transition<'_>) -> Result<VmRecord, StoreError> {
        // IMMEDIATE: take the write lock before reading, so the read-check-write cannot fail
        // half-way with SQLITE_BUSY_SNAPSHOT when another connection wrote in between.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query("SELECT * FROM vms WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let mut vm = vm_from_row(&row)?;
        if vm.state != t.from {
            return Err(StoreError::StateChanged {
                name: vm.name,
                expected: t.from,
                found: vm.state,
            });
        }
        vm.state = t.to;
        vm.updated_at = now();
        if let Some(pid) = t.pid {
            vm.pid = pid;
        }
        if let Some(err) = t.last_error {
            vm.last_error = err.map(str::to_owned);
        }
        sqlx::query(
            "UPDATE vms SET state = ?, updated_at = ?, pid = ?, last_error = ? WHERE id = ?",
        )
        .bind(vm.state.as_str())
        .bind(&vm.updated_at)
        .bind(vm.pid.map(i64::from))
        .bind(&vm.last_error)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, id, t.kind, Some(t.from), Some(t.to), t.message).await?;
        tx.commit().await?;
        Ok(vm)
    }

    /// Records the pid of a VMM that was just launched, so a hearthd that stops before the guest
    /// is ready can still find the process.
    pub async fn set_pid(&self, id: &str, pid: u32, message: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE vms SET pid = ?, updated_at = ? WHERE id = ?")
            .bind(i64::from(pid))
            .bind(now())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        insert_event(&mut tx, id, "vmm_launched", None, None, Some(message)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records an event that does not change state.
    pub async fn record_event(
        &self,
        id: &str,
        kind: &str,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_event(&mut tx, id, kind, None, None, message).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn events(&self, id: &str) -> Result<Vec<VmEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, kind, from_state, to_state, message FROM vm_events WHERE vm_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(VmEvent {
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    from_state: opt_state(r.try_get("from_state")?)?,
                    to_state: opt_state(r.try_get("to_state")?)?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    /// Removes a VM and its events.
    pub async fn delete_vm(&self, id: &str) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM vms WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: &str,
    kind: &str,
    from: Option<VmState>,
    to: Option<VmState>,
    message: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO vm_events (vm_id, at, kind, from_state, to_state, message) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(now())
    .bind(kind)
    .bind(from.map(VmState::as_str))
    .bind(to.map(VmState::as_str))
    .bind(message)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn opt_state(s: Option<String>) -> Result<Option<VmState>, StoreError> {
    s.map(|s| VmState::parse(&s).ok_or(StoreError::BadState(s)))
        .transpose()
}

fn vm_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<VmRecord, StoreError> {
    let state: String = r.try_get("state")?;
    let pid: Option<i64> = r.try_get("pid")?;
    Ok(VmRecord {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        state: VmState::parse(&state).ok_or(StoreError::BadState(state))?,
        cpus: u32::try_from(r.try_get::<i64, _>("cpus")?).unwrap_or(0),
        memory_mib: u64::try_from(r.try_get::<i64, _>("memory_mib")?).unwrap_or(0),
        rootfs_mib: u64::try_from(r.try_get::<i64, _>("rootfs_mib")?).unwrap_or(0),
        image: r.try_get("image")?,
        vmm: r.try_get("vmm")?,
        pid: pid.and_then(|p| u32::try_from(p).ok()),
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        last_error: r.try_get("last_error")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> VmRecord {
        VmRecord {
            id: format!("id-{name}"),
            name: name.into(),
            state: VmState::Creating,
            cpus: 1,
            memory_mib: 1024,
            rootfs_mib: 10240,
            image: "img".into(),
            vmm: "qemu".into(),
            pid: None,
            created_at: now(),
            updated_at: now(),
            last_error: None,
        }
    }

    async fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn insert_get_list_delete() {
        let (_dir, store) = open().await;
        store.insert_vm(&record("a")).await.unwrap();
        store.insert_vm(&record("b")).await.unwrap();
        assert!(matches!(
            store.insert_vm(&VmRecord { id: "other".into(), ..record("a") }).await,
            Err(StoreError::NameTaken(n)) if n == "a"
        ));
        assert_eq!(store.get_vm("a").await.unwrap().id, "id-a");
        assert_eq!(store.get_vm("id-b").await.unwrap().name, "b");
        assert_eq!(store.list_vms().await.unwrap().len(), 2);
        store.delete_vm("id-a").await.unwrap();
        assert!(matches!(
            store.get_vm("a").await,
            Err(StoreError::NotFound(_))
        ));
        assert!(store.events("id-a").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_name_wins_over_an_id_that_looks_the_same() {
        let (_dir, store) = open().await;
        store.insert_vm(&record("a")).await.unwrap();
        // A VM named like the other VM's id.
        let b = VmRecord {
            id: "id-b".into(),
            name: "id-a".into(),
            ..record("b")
        };
        store.insert_vm(&b).await.unwrap();
        assert_eq!(store.get_vm("id-a").await.unwrap().id, "id-b");
        assert_eq!(store.get_vm("a").await.unwrap().id, "id-a");
    }

    #[tokio::test]
    async fn transitions_are_checked_and_recorded() {
        let (_dir, store) = open().await;
        store.insert_vm(&record("a")).await.unwrap();
        let t = Transition {
            from: VmState::Creating,
            to: VmState::Error,
            kind: "create_failed",
            message: Some("boom"),
            pid: None,
            last_error: Some(Some("boom")),
        };
        let vm = store.transition("id-a", &t).await.unwrap();
        assert_eq!(vm.state, VmState::Error);
        assert_eq!(vm.last_error.as_deref(), Some("boom"));
        // Same transition again: the VM is no longer in `creating`.
        assert!(matches!(
            store.transition("id-a", &t).await,
            Err(StoreError::StateChanged {
                found: VmState::Error,
                ..
            })
        ));
        let events = store.events("id-a").await.unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].kind, "created");
        assert_eq!(events[1].from_state, Some(VmState::Creating));
        assert_eq!(events[1].message.as_deref(), Some("boom"));
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_skips_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.unwrap();
        store.insert_vm(&record("a")).await.unwrap();
        store.close().await;
        let store = Store::open(&url).await.unwrap();
        assert_eq!(store.list_vms().await.unwrap().len(), 1);
    }
}
