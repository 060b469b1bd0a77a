//! Persistent state: VMs and their events, through sqlx runtime queries on `sqlx::Any`, so one
//! set of queries serves the embedded SQLite file (the default: WAL, busy timeout) and
//! PostgreSQL. **Only this module knows SQL.**
//!
//! The shared queries use `$N` placeholders (SQLite reads them too) and only syntax both
//! backends have. What differs lives in [`Backend`]: how a writing transaction starts and locks
//! what it reads, how migrations exclude each other, and the migrations themselves
//! (`migrations/{sqlite,postgres}/`, the same versions on both). Rows are decoded into the
//! store's own types ([`VmRecord`], [`EventRecord`]), converted to the API's at the edge, so an
//! API change is never a schema change. A VM row that cannot be decoded is reported alone, with
//! its id (see [`VmList`]), and [`Store::mark_error`] can still settle it.

use std::os::unix::fs::OpenOptionsExt;
use std::str::FromStr;

use hearth_api::VmState;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Any, AnyPool, Connection, Row, Transaction};

pub mod access;
mod backup;
mod network;
pub mod secret;
#[cfg(test)]
mod tests;
mod volume;

pub use backup::BackupRecord;
pub use network::{EgressRecord, MetadataRecord, NetworkRecord};
pub use volume::VolumeRecord;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database URL {url:?} names no supported database: use sqlite://PATH or postgres://USER@HOST/DATABASE"
    )]
    Unsupported { url: String },
    #[error("cannot create the database file {path}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
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
    #[error("the stored VM {id:?} cannot be read: column {column} {reason}")]
    Unreadable {
        id: String,
        column: &'static str,
        reason: String,
    },
    /// A row the driver could not even convert, so no column is known.
    #[error("the stored VM {id:?} cannot be read: {reason}")]
    UnreadableRow { id: String, reason: String },
    #[error("an event of VM {id:?} cannot be read: column {column} {reason}")]
    UnreadableEvent {
        id: String,
        column: &'static str,
        reason: String,
    },
    #[error(
        "all {slots} /30 networks of network.cidr are taken: delete a VM, or give network.cidr a shorter prefix"
    )]
    NoAddresses { slots: u32 },
    #[error("no network {0:?}")]
    NoNetwork(String),
    #[error("VM {vm:?} has no backup {id:?}")]
    NoBackup { vm: String, id: String },
    #[error("a network named {0:?} already exists")]
    NetworkTaken(String),
    #[error("no volume {0:?}")]
    NoVolume(String),
    #[error("a volume named {0:?} already exists")]
    VolumeTaken(String),
    #[error("volume {volume:?} is attached to VM {vm:?}")]
    VolumeAttached { volume: String, vm: String },
    #[error("volume {volume:?} is not attached to VM {vm:?}")]
    VolumeNotAttached { volume: String, vm: String },
    #[error("VM {vm:?} already has a volume mounted at {path:?}")]
    VolumePathTaken { vm: String, path: String },
    #[error(
        "network {name:?} still has members ({members}): disconnect them or delete those VMs first"
    )]
    NetworkInUse { name: String, members: String },
    #[error("a {0} named {1:?} already exists")]
    Taken(&'static str, String),
    #[error("no organization {0:?}")]
    NoOrg(String),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
}

/// The databases the store runs on. Everything that is not the same SQL on both is here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Migrations in order; all pending ones run in one transaction. Additive only. Both backends
/// have the same versions (a test checks it).
const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_vms.sql")),
    (2, include_str!("../../migrations/sqlite/0002_network.sql")),
    (3, include_str!("../../migrations/sqlite/0003_backups.sql")),
    (
        4,
        include_str!("../../migrations/sqlite/0004_vm_creator.sql"),
    ),
    (5, include_str!("../../migrations/sqlite/0005_volumes.sql")),
    (6, include_str!("../../migrations/sqlite/0006_access.sql")),
    (7, include_str!("../../migrations/sqlite/0007_secrets.sql")),
];
const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_vms.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_network.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_backups.sql"),
    ),
    (
        4,
        include_str!("../../migrations/postgres/0004_vm_creator.sql"),
    ),
    (
        5,
        include_str!("../../migrations/postgres/0005_volumes.sql"),
    ),
    (6, include_str!("../../migrations/postgres/0006_access.sql")),
    (
        7,
        include_str!("../../migrations/postgres/0007_secrets.sql"),
    ),
];

/// Set on every SQLite connection. (sqlx's defaults already match the last two; they are
/// stated so the store does not depend on them.)
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
     PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;";

/// The PostgreSQL advisory lock key that serialises migrations of hearthds sharing a database.
const MIGRATION_LOCK: i64 = 0x6865_6172_7468; // "hearth"

impl Backend {
    /// The backend a database URL names, if the store supports it.
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }

    fn migrations(self) -> &'static [(i64, &'static str)] {
        match self {
            Backend::Sqlite => SQLITE_MIGRATIONS,
            Backend::Postgres => POSTGRES_MIGRATIONS,
        }
    }

    /// Starts a transaction that reads rows and writes them back: what it read (through
    /// [`Backend::lock_clause`]) cannot change under it before it commits.
    async fn begin_write(self, pool: &AnyPool) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self {
            // IMMEDIATE: take the write lock before reading, so the read-check-write cannot
            // fail half-way with SQLITE_BUSY_SNAPSHOT when another connection wrote in between.
            Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
            // Row locks, taken by the reads (`FOR UPDATE`).
            Backend::Postgres => pool.begin().await,
        }
    }

    /// Appended to a `SELECT` inside [`Backend::begin_write`]: it keeps the rows read locked
    /// until commit (a concurrent writer waits, then reads the new row).
    fn lock_clause(self) -> &'static str {
        match self {
            // The transaction already holds the database's write lock.
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// Inside [`Backend::begin_write`]: makes hearthds that start at once against one database
    /// migrate one after the other.
    async fn lock_migrations(self, tx: &mut Transaction<'_, Any>) -> Result<(), sqlx::Error> {
        match self {
            // BEGIN IMMEDIATE already excludes every other writer.
            Backend::Sqlite => Ok(()),
            Backend::Postgres => {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(MIGRATION_LOCK)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
        }
    }
}

/// A VM as stored. The API's [`hearth_api::Vm`] is made from it at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub state: VmState,
    pub cpus: u32,
    pub memory_mib: u64,
    pub rootfs_mib: u64,
    pub image: String,
    pub vmm: String,
    pub pid: Option<u32>,
    pub created_at: String,
    /// The principal that made it (or made the VM an import came from).
    pub created_by: String,
    /// The organization it belongs to.
    pub org: String,
    pub updated_at: String,
    pub last_error: Option<String>,
    /// The index of the VM's /30 in `network.cidr`; `None` for a VM made without networking.
    pub net_index: Option<u32>,
    pub egress: EgressRecord,
    pub metadata: MetadataRecord,
}

impl From<VmRecord> for hearth_api::Vm {
    fn from(r: VmRecord) -> Self {
        hearth_api::Vm {
            id: r.id,
            name: r.name,
            state: r.state,
            cpus: r.cpus,
            memory_mib: r.memory_mib,
            rootfs_mib: r.rootfs_mib,
            image: r.image,
            vmm: r.vmm,
            pid: r.pid,
            created_at: r.created_at,
            created_by: r.created_by,
            org: r.org,
            updated_at: r.updated_at,
            last_error: r.last_error,
        }
    }
}

/// A recorded event as stored. The API's [`hearth_api::VmEvent`] is made from it at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub at: String,
    pub kind: String,
    pub from_state: Option<VmState>,
    pub to_state: Option<VmState>,
    pub message: Option<String>,
}

impl From<EventRecord> for hearth_api::VmEvent {
    fn from(r: EventRecord) -> Self {
        hearth_api::VmEvent {
            at: r.at,
            kind: r.kind,
            from_state: r.from_state,
            to_state: r.to_state,
            message: r.message,
        }
    }
}

/// Every VM, oldest first: the rows that decode, and the ones that do not, each alone.
#[derive(Debug, Default)]
pub struct VmList {
    pub vms: Vec<VmRecord>,
    pub unreadable: Vec<UnreadableVm>,
}

/// A VM row that cannot be decoded (written by a newer hearthd, or damaged). What could be
/// read of it is here; [`Store::mark_error`] settles it by id.
#[derive(Debug)]
pub struct UnreadableVm {
    pub id: String,
    pub name: Option<String>,
    /// `None` when the state is what cannot be read.
    pub state: Option<VmState>,
    /// [`StoreError::Unreadable`] (naming the column and why) or
    /// [`StoreError::UnreadableRow`].
    pub error: StoreError,
}

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
    pool: AnyPool,
    backend: Backend,
}

/// Current time, RFC 3339 with milliseconds, UTC.
pub fn now() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

/// `t` as the store writes times: RFC 3339 in UTC with milliseconds, so they sort as text.
pub fn format_time(t: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

/// `url` with its password (in the user part or a `password=` parameter) replaced by `***`,
/// for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl Store {
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let backend = Backend::of_url(url).ok_or_else(|| StoreError::Unsupported {
            url: redact_url(url),
        })?;
        let open_err = |source| StoreError::Open {
            url: redact_url(url),
            source,
        };
        if backend == Backend::Sqlite {
            create_sqlite_file(url)?;
        }
        sqlx::any::install_default_drivers();
        // One connection first: a database that cannot be reached fails here at once with its
        // reason, where the pool would retry until its acquire timeout.
        sqlx::AnyConnection::connect(url)
            .await
            .map_err(open_err)?
            .close()
            .await
            .map_err(open_err)?;
        let mut options = AnyPoolOptions::new().max_connections(4);
        if backend == Backend::Sqlite {
            options = options.after_connect(sqlite_pragmas);
        }
        let pool = options.connect(url).await.map_err(open_err)?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let migrations = self.backend.migrations();
        let known = migrations.last().map_or(0, |m| m.0);
        let mut tx = self.backend.begin_write(&self.pool).await?;
        self.backend.lock_migrations(&mut tx).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY NOT NULL, applied_at TEXT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let current: i64 =
            sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
                .fetch_one(&mut *tx)
                .await?
                .try_get("v")?;
        if current > known {
            return Err(StoreError::TooNew {
                found: current,
                known,
            });
        }
        for (version, sql) in migrations.iter().filter(|(v, _)| *v > current) {
            let err = |source| StoreError::Migrate {
                version: *version,
                source,
            };
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(err)?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Inserts a new VM, without networking, and its `created` event atomically.
    #[cfg(test)]
    pub async fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.insert_vm_with(vm, None, &[], &[]).await.map(drop)
    }

    /// Inserts a new VM and its `created` event atomically. With `slots` (how many /30s
    /// `network.cidr` holds) the VM gets the lowest free one in the same transaction, joins
    /// `networks` (which must exist) and gets `volumes` (name, mount path; each must exist
    /// and be attached to no VM). Returns the record as stored.
    pub async fn insert_vm_with(
        &self,
        vm: &VmRecord,
        slots: Option<u32>,
        networks: &[String],
        volumes: &[(String, String)],
    ) -> Result<VmRecord, StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let mut vm = vm.clone();
        vm.net_index = match slots {
            Some(slots) => Some(network::free_index(self.backend, &mut tx, slots).await?),
            None => None,
        };
        let inserted = sqlx::query(
            "INSERT INTO vms (id, name, state, cpus, memory_mib, rootfs_mib, image, vmm, pid, created_at, updated_at, last_error, net_index, egress, metadata, created_by, org)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(&vm.id)
        .bind(&vm.name)
        .bind(state_text(vm.state))
        .bind(i64::from(vm.cpus))
        .bind(i64::try_from(vm.memory_mib).unwrap_or(i64::MAX))
        .bind(i64::try_from(vm.rootfs_mib).unwrap_or(i64::MAX))
        .bind(&vm.image)
        .bind(&vm.vmm)
        .bind(vm.pid.map(i64::from))
        .bind(&vm.created_at)
        .bind(&vm.updated_at)
        .bind(vm.last_error.as_deref())
        .bind(vm.net_index.map(i64::from))
        .bind(network::to_json(&vm.egress))
        .bind(network::to_json(&vm.metadata))
        .bind(&vm.created_by)
        .bind(&vm.org)
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
        for net in networks {
            network::add_member(&mut tx, net, &vm.id).await?;
        }
        for (volume, path) in volumes {
            volume::attach(self.backend, &mut tx, &vm.id, &vm.name, volume, path).await?;
        }
        tx.commit().await?;
        Ok(vm)
    }

    /// Every VM, oldest first. A row that cannot be decoded does not hide the others: it is
    /// listed in [`VmList::unreadable`] with its id and the reason.
    pub async fn list_vms(&self) -> Result<VmList, StoreError> {
        let mut list = VmList::default();
        match sqlx::query("SELECT * FROM vms ORDER BY created_at, name")
            .fetch_all(&self.pool)
            .await
        {
            Ok(rows) => {
                for row in &rows {
                    list.push(row, vm_from_row(row))?;
                }
            }
            // A value the driver cannot even convert (in SQLite, text that is not UTF-8) fails
            // the whole query: read the rows one by one to find which.
            Err(_) => {
                let ids = sqlx::query("SELECT id FROM vms ORDER BY created_at, name")
                    .fetch_all(&self.pool)
                    .await?;
                for id in &ids {
                    let id: String = id.try_get("id")?;
                    match sqlx::query("SELECT * FROM vms WHERE id = $1")
                        .bind(&id)
                        .fetch_optional(&self.pool)
                        .await
                    {
                        Ok(Some(row)) => list.push(&row, vm_from_row(&row))?,
                        // Deleted meanwhile.
                        Ok(None) => {}
                        Err(e) => {
                            // What can still be read of it.
                            let some = sqlx::query("SELECT name, state FROM vms WHERE id = $1")
                                .bind(&id)
                                .fetch_optional(&self.pool)
                                .await
                                .ok()
                                .flatten();
                            let some = some.as_ref();
                            list.unreadable.push(UnreadableVm {
                                error: StoreError::UnreadableRow {
                                    id: id.clone(),
                                    reason: e.to_string(),
                                },
                                id,
                                name: some.and_then(|r| r.try_get("name").ok()),
                                state: some
                                    .and_then(|r| r.try_get::<String, _>("state").ok())
                                    .and_then(|s| state_from_text(&s)),
                            })
                        }
                    }
                }
            }
        }
        Ok(list)
    }

    /// Finds a VM by name or id.
    pub async fn get_vm(&self, name_or_id: &str) -> Result<VmRecord, StoreError> {
        // A name wins over an id that happens to look the same.
        let row = sqlx::query(
            "SELECT * FROM vms WHERE name = $1 OR id = $1 ORDER BY (name = $1) DESC LIMIT 1",
        )
        .bind(name_or_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(name_or_id.to_owned()))?;
        vm_from_row(&row)
    }

    /// Moves a VM from `t.from` to `t.to` and records the event, atomically. Fails with
    /// [`StoreError::StateChanged`] when the VM is no longer in `t.from`.
    pub async fn transition(&self, id: &str, t: &Transition<'_>) -> Result<VmRecord, StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let select = format!(
            "SELECT * FROM vms WHERE id = $1{}",
            self.backend.lock_clause()
        );
        let row = sqlx::query(&select)
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
            "UPDATE vms SET state = $1, updated_at = $2, pid = $3, last_error = $4 WHERE id = $5",
        )
        .bind(state_text(vm.state))
        .bind(&vm.updated_at)
        .bind(vm.pid.map(i64::from))
        .bind(vm.last_error.as_deref())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, id, t.kind, Some(t.from), Some(t.to), t.message).await?;
        tx.commit().await?;
        Ok(vm)
    }

    /// Puts a VM in `error` with `message` as its `last_error` and records event `kind`, by id,
    /// without reading the rest of its row: for a VM listed in [`VmList::unreadable`]. The event
    /// has no `from` state (the stored one may be what cannot be read). The pid is kept: it may
    /// still name a running VMM.
    pub async fn mark_error(&self, id: &str, kind: &str, message: &str) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let done = sqlx::query(
            "UPDATE vms SET state = $1, last_error = $2, updated_at = $3 WHERE id = $4",
        )
        .bind(state_text(VmState::Error))
        .bind(message)
        .bind(now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        insert_event(&mut tx, id, kind, None, Some(VmState::Error), Some(message)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Gives a stopped VM its new shape and records event `resized` with `message`. Fails
    /// with [`StoreError::NotFound`] when the VM is gone or no longer stopped.
    pub async fn resize_vm(
        &self,
        id: &str,
        (cpus, memory_mib, rootfs_mib): (u32, u64, u64),
        message: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let done = sqlx::query(
            "UPDATE vms SET cpus = $1, memory_mib = $2, rootfs_mib = $3, updated_at = $4 WHERE id = $5 AND state = $6",
        )
        .bind(i64::from(cpus))
        .bind(i64::try_from(memory_mib).unwrap_or(i64::MAX))
        .bind(i64::try_from(rootfs_mib).unwrap_or(i64::MAX))
        .bind(now())
        .bind(id)
        .bind(state_text(VmState::Stopped))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        insert_event(&mut tx, id, "resized", None, None, Some(message)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records the pid of a VMM that was just launched, so a hearthd that stops before the guest
    /// is ready can still find the process.
    pub async fn set_pid(
        &self,
        id: &str,
        pid: u32,
        kind: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        sqlx::query("UPDATE vms SET pid = $1, updated_at = $2 WHERE id = $3")
            .bind(i64::from(pid))
            .bind(now())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        insert_event(&mut tx, id, kind, None, None, Some(message)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records an event of VM `id` that changes nothing else about it (an export).
    pub async fn note(&self, id: &str, kind: &str, message: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_event(&mut tx, id, kind, None, None, Some(message)).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn events(&self, id: &str) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, kind, from_state, to_state, message FROM vm_events WHERE vm_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let bad = |column, reason| StoreError::UnreadableEvent {
                    id: id.to_owned(),
                    column,
                    reason,
                };
                let get = |column: &'static str| {
                    r.try_get::<Option<String>, _>(column)
                        .map_err(|e| bad(column, decode_reason(e)))
                };
                let state = |column: &'static str| {
                    get(column)?
                        .map(|s| state_from_text(&s).ok_or_else(|| bad(column, unknown_state(&s))))
                        .transpose()
                };
                let required = |column: &'static str| {
                    get(column)?.ok_or_else(|| bad(column, "is empty".into()))
                };
                Ok(EventRecord {
                    at: required("at")?,
                    kind: required("kind")?,
                    from_state: state("from_state")?,
                    to_state: state("to_state")?,
                    message: get("message")?,
                })
            })
            .collect()
    }

    /// Removes a VM and its events; its volumes are detached and kept.
    pub async fn delete_vm(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        // The foreign key clears `vm_id` by itself; the mount path goes with it.
        sqlx::query(
            "UPDATE volumes SET vm_id = NULL, path = NULL, attached_at = NULL WHERE vm_id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query("DELETE FROM vms WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs `sql` with `$1` bound to `arg`, unchecked: how tests damage a row.
    #[cfg(test)]
    pub(crate) async fn execute_for_test(&self, sql: &str, arg: &str) {
        sqlx::query(sql)
            .bind(arg)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl VmList {
    /// Files one decoded (or not) row. Errors other than an unreadable row end the listing.
    fn push(&mut self, row: &AnyRow, vm: Result<VmRecord, StoreError>) -> Result<(), StoreError> {
        match vm {
            Ok(vm) => self.vms.push(vm),
            Err(error @ StoreError::Unreadable { .. }) => {
                let StoreError::Unreadable { id, .. } = &error else {
                    unreachable!("matched just above")
                };
                self.unreadable.push(UnreadableVm {
                    id: id.clone(),
                    name: row.try_get("name").ok(),
                    state: row
                        .try_get::<String, _>("state")
                        .ok()
                        .and_then(|s| state_from_text(&s)),
                    error,
                })
            }
            Err(other) => return Err(other),
        }
        Ok(())
    }
}

/// Run on every new SQLite connection.
fn sqlite_pragmas<'c>(
    conn: &'c mut sqlx::AnyConnection,
    _: sqlx::pool::PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::Executor::execute(conn, SQLITE_PRAGMAS).await?;
        Ok(())
    })
}

/// Creates the SQLite file, mode 0600, when it does not exist yet: SQLite would create it
/// with the process's default mode, and its `-wal` and `-shm` files take the mode of the
/// database file.
fn create_sqlite_file(url: &str) -> Result<(), StoreError> {
    let options = SqliteConnectOptions::from_str(url).map_err(|source| StoreError::Open {
        url: redact_url(url),
        source,
    })?;
    if url.contains(":memory:") || url.contains("mode=memory") {
        return Ok(());
    }
    let path = options.get_filename();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Create {
            path: path.display().to_string(),
            source,
        }),
    }
}

async fn insert_event(
    tx: &mut Transaction<'_, Any>,
    id: &str,
    kind: &str,
    from: Option<VmState>,
    to: Option<VmState>,
    message: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO vm_events (vm_id, at, kind, from_state, to_state, message) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(now())
    .bind(kind)
    .bind(from.map(state_text))
    .bind(to.map(state_text))
    .bind(message)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// How a state is stored. The store's own spelling: renaming a state in the API does not
/// change what is in the database.
fn state_text(state: VmState) -> &'static str {
    match state {
        VmState::Creating => "creating",
        VmState::Stopped => "stopped",
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "stopping",
        VmState::Error => "error",
        VmState::Deleting => "deleting",
    }
}

fn state_from_text(text: &str) -> Option<VmState> {
    VmState::ALL.into_iter().find(|s| state_text(*s) == text)
}

fn unknown_state(text: &str) -> String {
    format!("holds {text:?}, which is no VM state")
}

/// Why a column could not be read, without repeating the column sqlx already names.
fn decode_reason(e: sqlx::Error) -> String {
    match e {
        sqlx::Error::ColumnDecode { source, .. } => format!("cannot be decoded: {source}"),
        other => format!("cannot be read: {other}"),
    }
}

fn vm_from_row(r: &AnyRow) -> Result<VmRecord, StoreError> {
    let id: String = r.try_get("id")?;
    let bad = |column, reason| StoreError::Unreadable {
        id: id.clone(),
        column,
        reason,
    };
    let text = |column: &'static str| {
        r.try_get::<String, _>(column)
            .map_err(|e| bad(column, decode_reason(e)))
    };
    let number = |column: &'static str| {
        r.try_get::<i64, _>(column)
            .map_err(|e| bad(column, decode_reason(e)))
    };
    fn fit<T: TryFrom<i64>>(
        value: i64,
        column: &'static str,
        bad: &dyn Fn(&'static str, String) -> StoreError,
    ) -> Result<T, StoreError> {
        T::try_from(value).map_err(|_| {
            bad(
                column,
                format!(
                    "holds {value}, out of range for {}",
                    std::any::type_name::<T>()
                ),
            )
        })
    }
    let state = text("state")?;
    let pid = r
        .try_get::<Option<i64>, _>("pid")
        .map_err(|e| bad("pid", decode_reason(e)))?
        .map(|p| fit::<u32>(p, "pid", &bad))
        .transpose()?;
    Ok(VmRecord {
        name: text("name")?,
        state: state_from_text(&state).ok_or_else(|| bad("state", unknown_state(&state)))?,
        cpus: fit(number("cpus")?, "cpus", &bad)?,
        memory_mib: fit(number("memory_mib")?, "memory_mib", &bad)?,
        rootfs_mib: fit(number("rootfs_mib")?, "rootfs_mib", &bad)?,
        image: text("image")?,
        vmm: text("vmm")?,
        pid,
        created_at: text("created_at")?,
        created_by: text("created_by")?,
        org: text("org")?,
        updated_at: text("updated_at")?,
        last_error: r
            .try_get("last_error")
            .map_err(|e| bad("last_error", decode_reason(e)))?,
        net_index: r
            .try_get::<Option<i64>, _>("net_index")
            .map_err(|e| bad("net_index", decode_reason(e)))?
            .map(|i| fit::<u32>(i, "net_index", &bad))
            .transpose()?,
        egress: network::from_json(r, "egress").map_err(|reason| bad("egress", reason))?,
        metadata: network::from_json(r, "metadata").map_err(|reason| bad("metadata", reason))?,
        id,
    })
}
