//! The store's side of networking: each VM's /30 (IPAM: `vms.net_index`), its egress policy and
//! instance metadata (JSON of the store's own types, in `vms.egress` and `vms.metadata`), and
//! private networks with their members.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{Backend, Store, StoreError, insert_event, now};

/// The PostgreSQL advisory lock that makes address allocations one after the other (SQLite's
/// `BEGIN IMMEDIATE` already does).
const IPAM_LOCK: i64 = 0x6865_6172_7470; // "hearthp"

/// A VM's egress policy as stored. Destinations are kept as written (validated on the way in).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EgressRecord {
    /// `deny_all` (true) or `allow_all`.
    pub deny_all: bool,
    pub allow_cidrs: Vec<String>,
    pub deny_cidrs: Vec<String>,
    pub allow_ports: Vec<u16>,
    pub allow_domains: Vec<String>,
}

/// What the metadata service gives a VM besides what hearthd knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MetadataRecord {
    pub user_data: Option<String>,
    pub ssh_authorized_keys: Vec<String>,
}

/// A private network and the ids of its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRecord {
    pub name: String,
    pub created_at: String,
    /// The organization it belongs to.
    pub org: String,
    pub members: Vec<String>,
}

pub(super) fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".into())
}

/// A JSON column; NULL (a row from before networking) is the default.
pub(super) fn from_json<T: for<'de> Deserialize<'de> + Default>(
    row: &AnyRow,
    column: &str,
) -> Result<T, String> {
    let text: Option<String> = row
        .try_get(column)
        .map_err(|e| format!("cannot be read: {e}"))?;
    match text {
        None => Ok(T::default()),
        Some(text) => serde_json::from_str(&text).map_err(|e| format!("is not valid JSON: {e}")),
    }
}

/// The lowest /30 index below `slots` that no VM holds.
pub(super) async fn free_index(
    backend: Backend,
    tx: &mut Transaction<'_, Any>,
    slots: u32,
) -> Result<u32, StoreError> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(IPAM_LOCK)
            .execute(&mut **tx)
            .await?;
    }
    // 0 when it is free, else the first index right after a taken one that is itself free.
    let row = sqlx::query(
        "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM vms WHERE net_index = 0) THEN 0
                ELSE (SELECT MIN(a.net_index) + 1 FROM vms a
                      WHERE a.net_index IS NOT NULL
                        AND NOT EXISTS (SELECT 1 FROM vms b WHERE b.net_index = a.net_index + 1))
                END AS free",
    )
    .fetch_one(&mut **tx)
    .await?;
    let free: i64 = row.try_get("free")?;
    match u32::try_from(free) {
        Ok(i) if i < slots => Ok(i),
        _ => Err(StoreError::NoAddresses { slots }),
    }
}

pub(super) async fn add_member(
    tx: &mut Transaction<'_, Any>,
    network: &str,
    vm_id: &str,
) -> Result<bool, StoreError> {
    let exists = sqlx::query("SELECT 1 AS one FROM networks WHERE name = $1")
        .bind(network)
        .fetch_optional(&mut **tx)
        .await?;
    if exists.is_none() {
        return Err(StoreError::NoNetwork(network.to_owned()));
    }
    let already =
        sqlx::query("SELECT 1 AS one FROM network_members WHERE network = $1 AND vm_id = $2")
            .bind(network)
            .bind(vm_id)
            .fetch_optional(&mut **tx)
            .await?;
    if already.is_some() {
        return Ok(false);
    }
    sqlx::query("INSERT INTO network_members (network, vm_id) VALUES ($1, $2)")
        .bind(network)
        .bind(vm_id)
        .execute(&mut **tx)
        .await?;
    Ok(true)
}

impl Store {
    pub async fn create_network(&self, name: &str, org: &str) -> Result<NetworkRecord, StoreError> {
        let created_at = now();
        let done = sqlx::query("INSERT INTO networks (name, created_at, org) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(&created_at)
            .bind(org)
            .execute(&self.pool)
            .await;
        match done {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::NetworkTaken(name.to_owned()))
            }
            other => {
                other?;
                Ok(NetworkRecord {
                    name: name.to_owned(),
                    created_at,
                    org: org.to_owned(),
                    members: Vec::new(),
                })
            }
        }
    }

    /// Every private network with its members (VM ids), by name.
    pub async fn list_networks(&self) -> Result<Vec<NetworkRecord>, StoreError> {
        let nets = sqlx::query("SELECT name, created_at, org FROM networks ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        let members =
            sqlx::query("SELECT network, vm_id FROM network_members ORDER BY network, vm_id")
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::with_capacity(nets.len());
        for n in &nets {
            let name: String = n.try_get("name")?;
            let mut record = NetworkRecord {
                created_at: n.try_get("created_at")?,
                org: n.try_get("org")?,
                members: Vec::new(),
                name,
            };
            for m in &members {
                let network: String = m.try_get("network")?;
                if network == record.name {
                    record.members.push(m.try_get("vm_id")?);
                }
            }
            out.push(record);
        }
        Ok(out)
    }

    pub async fn get_network(&self, name: &str) -> Result<NetworkRecord, StoreError> {
        self.list_networks()
            .await?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| StoreError::NoNetwork(name.to_owned()))
    }

    /// Deletes a network that has no members.
    pub async fn delete_network(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let members = sqlx::query(
            "SELECT v.name AS name FROM network_members m JOIN vms v ON v.id = m.vm_id
             WHERE m.network = $1 ORDER BY v.name",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        if !members.is_empty() {
            let names: Vec<String> = members
                .iter()
                .filter_map(|r| r.try_get::<String, _>("name").ok())
                .collect();
            return Err(StoreError::NetworkInUse {
                name: name.to_owned(),
                members: names.join(", "),
            });
        }
        let done = sqlx::query("DELETE FROM networks WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NoNetwork(name.to_owned()));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Puts VM `vm_id` in `network` and records the event; false when it was a member already.
    pub async fn join_network(&self, network: &str, vm_id: &str) -> Result<bool, StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let added = add_member(&mut tx, network, vm_id).await?;
        if added {
            let message = format!("joined network {network}");
            insert_event(&mut tx, vm_id, "network_joined", None, None, Some(&message)).await?;
        }
        tx.commit().await?;
        Ok(added)
    }

    /// Takes VM `vm_id` out of `network`; false when it was not a member.
    pub async fn leave_network(&self, network: &str, vm_id: &str) -> Result<bool, StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let exists = sqlx::query("SELECT 1 AS one FROM networks WHERE name = $1")
            .bind(network)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NoNetwork(network.to_owned()));
        }
        let done = sqlx::query("DELETE FROM network_members WHERE network = $1 AND vm_id = $2")
            .bind(network)
            .bind(vm_id)
            .execute(&mut *tx)
            .await?;
        let removed = done.rows_affected() > 0;
        if removed {
            let message = format!("left network {network}");
            insert_event(&mut tx, vm_id, "network_left", None, None, Some(&message)).await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    /// The networks VM `vm_id` is a member of, by name.
    pub async fn vm_networks(&self, vm_id: &str) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query("SELECT network FROM network_members WHERE vm_id = $1 ORDER BY network")
                .bind(vm_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| r.try_get("network").map_err(StoreError::from))
            .collect()
    }

    /// Replaces VM `vm_id`'s egress policy and records `message` as an `egress_changed` event.
    pub async fn set_egress(
        &self,
        vm_id: &str,
        egress: &EgressRecord,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        let done = sqlx::query("UPDATE vms SET egress = $1, updated_at = $2 WHERE id = $3")
            .bind(to_json(egress))
            .bind(now())
            .bind(vm_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(vm_id.to_owned()));
        }
        insert_event(&mut tx, vm_id, "egress_changed", None, None, Some(message)).await?;
        tx.commit().await?;
        Ok(())
    }
}
