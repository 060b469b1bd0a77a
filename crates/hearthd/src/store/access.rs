//! Users, organizations and their members, SSH public keys, API keys and the audit log (see the
//! migration). Names are the keys. Only the SHA-256 of an API key is stored.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, now};

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    /// The stored host-admin flag (`auth.admin_users` adds to it).
    pub admin: bool,
    pub active_org: Option<String>,
    pub created_at: String,
}

/// An SSH public key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKeyRecord {
    pub fingerprint: String,
    pub user: String,
    /// `type base64`.
    pub public_key: String,
    pub comment: String,
    pub created_at: String,
}

/// An API key as stored: its hash, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub user: String,
    pub org: String,
    pub name: String,
    /// Hex SHA-256 of the whole key.
    pub hash: String,
    pub created_at: String,
}

/// One audit row to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub at: String,
    pub principal: String,
    pub org: Option<String>,
    pub source: String,
    pub action: String,
    pub target: Option<String>,
    pub allowed: bool,
    pub result: String,
    pub duration_ms: u64,
    pub request_id: String,
}

/// What `hearth audit` asks for; every field narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub principal: Option<String>,
    pub org: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    /// `allow` or `deny`.
    pub decision: Option<String>,
    /// RFC 3339: rows at or after it.
    pub since: Option<String>,
    pub limit: u32,
}

fn user_from_row(r: &AnyRow) -> Result<UserRecord, StoreError> {
    let admin: i64 = r.try_get("admin")?;
    Ok(UserRecord {
        name: r.try_get("name")?,
        admin: admin != 0,
        active_org: r.try_get("active_org")?,
        created_at: r.try_get("created_at")?,
    })
}

fn ssh_key_from_row(r: &AnyRow) -> Result<SshKeyRecord, StoreError> {
    Ok(SshKeyRecord {
        fingerprint: r.try_get("fingerprint")?,
        user: r.try_get("user_name")?,
        public_key: r.try_get("public_key")?,
        comment: r.try_get("comment")?,
        created_at: r.try_get("created_at")?,
    })
}

fn api_key_from_row(r: &AnyRow) -> Result<ApiKeyRecord, StoreError> {
    Ok(ApiKeyRecord {
        id: r.try_get("id")?,
        user: r.try_get("user_name")?,
        org: r.try_get("org")?,
        name: r.try_get("name")?,
        hash: r.try_get("hash")?,
        created_at: r.try_get("created_at")?,
    })
}

fn role_from_text(text: &str) -> hearth_api::Role {
    match text {
        "owner" => hearth_api::Role::Owner,
        _ => hearth_api::Role::Member,
    }
}

/// A unique violation becomes `taken`, anything else stays what it was.
fn taken(e: sqlx::Error, taken: StoreError) -> StoreError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => taken,
        e => StoreError::Query(e),
    }
}

impl Store {
    pub async fn count_users(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// Makes organization `name` unless it exists.
    pub async fn ensure_org(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO orgs (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Makes a user in one transaction: the row, optionally a new organization it owns
    /// (`new_org`), its membership of `org` with `role` (which it also acts in), and `key`.
    pub async fn create_user(
        &self,
        user: &UserRecord,
        org: &str,
        new_org: bool,
        role: hearth_api::Role,
        key: Option<&SshKeyRecord>,
    ) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        sqlx::query(
            "INSERT INTO users (name, admin, active_org, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&user.name)
        .bind(i64::from(user.admin))
        .bind(org)
        .bind(&user.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| taken(e, StoreError::Taken("user", user.name.clone())))?;
        if new_org {
            sqlx::query("INSERT INTO orgs (name, created_at) VALUES ($1, $2)")
                .bind(org)
                .bind(&user.created_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| taken(e, StoreError::Taken("organization", org.to_owned())))?;
        } else if sqlx::query("SELECT name FROM orgs WHERE name = $1")
            .bind(org)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NoOrg(org.to_owned()));
        }
        sqlx::query("INSERT INTO org_members (org, user_name, role) VALUES ($1, $2, $3)")
            .bind(org)
            .bind(&user.name)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
        if let Some(key) = key {
            insert_ssh_key(&mut tx, key).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        sqlx::query("SELECT * FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| user_from_row(&r))
            .transpose()
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        sqlx::query("SELECT * FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(user_from_row)
            .collect()
    }

    /// Deletes a user with its keys and memberships; false when there was none.
    pub async fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The organizations `user` belongs to, by name, with the role there.
    pub async fn memberships(
        &self,
        user: &str,
    ) -> Result<Vec<(String, hearth_api::Role)>, StoreError> {
        let rows =
            sqlx::query("SELECT org, role FROM org_members WHERE user_name = $1 ORDER BY org")
                .bind(user)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                let role: String = r.try_get("role")?;
                Ok((r.try_get("org")?, role_from_text(&role)))
            })
            .collect()
    }

    pub async fn set_active_org(&self, user: &str, org: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE users SET active_org = $1 WHERE name = $2")
            .bind(org)
            .bind(user)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn add_ssh_key(&self, key: &SshKeyRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_ssh_key(&mut tx, key).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn ssh_key(&self, fingerprint: &str) -> Result<Option<SshKeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM ssh_keys WHERE fingerprint = $1")
            .bind(fingerprint)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| ssh_key_from_row(&r))
            .transpose()
    }

    /// The SSH keys of `user`, or of everyone.
    pub async fn list_ssh_keys(&self, user: Option<&str>) -> Result<Vec<SshKeyRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM ssh_keys WHERE ($1 IS NULL OR user_name = $1) ORDER BY user_name, created_at",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(ssh_key_from_row)
        .collect()
    }

    /// Removes `user`'s key `fingerprint`; false when the user has no such key.
    pub async fn remove_ssh_key(&self, user: &str, fingerprint: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM ssh_keys WHERE user_name = $1 AND fingerprint = $2")
            .bind(user)
            .bind(fingerprint)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, user_name, org, name, hash, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.id)
        .bind(&key.user)
        .bind(&key.org)
        .bind(&key.name)
        .bind(&key.hash)
        .bind(&key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| api_key_from_row(&r))
            .transpose()
    }

    /// The API keys of `user`, or of everyone.
    pub async fn list_api_keys(&self, user: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM api_keys WHERE ($1 IS NULL OR user_name = $1) ORDER BY user_name, created_at",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(api_key_from_row)
        .collect()
    }

    /// Revokes (deletes) API key `id`; false when there was none.
    pub async fn delete_api_key(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM api_keys WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Makes organization `name` with `owner` as its owner.
    pub async fn create_org(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO orgs (name, created_at) VALUES ($1, $2)")
            .bind(name)
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(|e| taken(e, StoreError::Taken("organization", name.to_owned())))?;
        sqlx::query("INSERT INTO org_members (org, user_name, role) VALUES ($1, $2, 'owner')")
            .bind(name)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Organization `name`'s creation time, if it exists.
    pub async fn org_created_at(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query("SELECT created_at FROM orgs WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get("created_at"))
            .transpose()?)
    }

    /// Every organization's name and creation time.
    pub async fn list_orgs(&self) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query("SELECT name, created_at FROM orgs ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("name")?, r.try_get("created_at")?)))
            .collect()
    }

    /// The members of `org` with their roles.
    pub async fn org_members(
        &self,
        org: &str,
    ) -> Result<Vec<(String, hearth_api::Role)>, StoreError> {
        let rows = sqlx::query(
            "SELECT user_name, role FROM org_members WHERE org = $1 ORDER BY user_name",
        )
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let role: String = r.try_get("role")?;
                Ok((r.try_get("user_name")?, role_from_text(&role)))
            })
            .collect()
    }

    /// Puts `user` in `org` with `role` (or changes the role of a member).
    pub async fn set_member(
        &self,
        org: &str,
        user: &str,
        role: hearth_api::Role,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO org_members (org, user_name, role) VALUES ($1, $2, $3)
             ON CONFLICT (org, user_name) DO UPDATE SET role = excluded.role",
        )
        .bind(org)
        .bind(user)
        .bind(role.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes `user` out of `org`, with the API keys the user made for it; false when the user
    /// was not a member. A user acting in it falls back to no active organization.
    pub async fn remove_member(&self, org: &str, user: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM org_members WHERE org = $1 AND user_name = $2")
            .bind(org)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM api_keys WHERE org = $1 AND user_name = $2")
            .bind(org)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE users SET active_org = NULL WHERE name = $1 AND active_org = $2")
            .bind(user)
            .bind(org)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// The organization of network `name`, if it exists.
    pub async fn network_org(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.org_of("networks", name).await
    }

    /// The organization of volume `name`, if it exists.
    pub async fn volume_org(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.org_of("volumes", name).await
    }

    async fn org_of(&self, table: &'static str, name: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query(&format!("SELECT org FROM {table} WHERE name = $1"))
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.try_get("org"))
                .transpose()?,
        )
    }

    /// Appends one audit row and returns its sequence number.
    pub async fn insert_audit(&self, a: &AuditRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit (at, principal, org, source, action, target, decision, result, duration_ms, request_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&a.at)
        .bind(&a.principal)
        .bind(a.org.as_deref())
        .bind(&a.source)
        .bind(&a.action)
        .bind(a.target.as_deref())
        .bind(if a.allowed { "allow" } else { "deny" })
        .bind(&a.result)
        .bind(i64::try_from(a.duration_ms).unwrap_or(i64::MAX))
        .bind(&a.request_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Keeps the newest `keep` audit rows.
    pub async fn prune_audit(&self, keep: u64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - $1")
            .bind(i64::try_from(keep).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Audit rows matching `f`, newest first.
    pub async fn audit(&self, f: &AuditFilter) -> Result<Vec<hearth_api::AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM audit
             WHERE ($1 IS NULL OR principal = $1) AND ($2 IS NULL OR org = $2)
               AND ($3 IS NULL OR action = $3) AND ($4 IS NULL OR target = $4)
               AND ($5 IS NULL OR decision = $5) AND ($6 IS NULL OR at >= $6)
             ORDER BY seq DESC LIMIT $7",
        )
        .bind(f.principal.as_deref())
        .bind(f.org.as_deref())
        .bind(f.action.as_deref())
        .bind(f.target.as_deref())
        .bind(f.decision.as_deref())
        .bind(f.since.as_deref())
        .bind(i64::from(f.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let ms: i64 = r.try_get("duration_ms")?;
                Ok(hearth_api::AuditEntry {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    principal: r.try_get("principal")?,
                    org: r.try_get("org")?,
                    source: r.try_get("source")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    decision: r.try_get("decision")?,
                    result: r.try_get("result")?,
                    duration_ms: u64::try_from(ms).unwrap_or(0),
                    request_id: r.try_get("request_id")?,
                })
            })
            .collect()
    }
}

async fn insert_ssh_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    key: &SshKeyRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO ssh_keys (fingerprint, user_name, public_key, comment, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&key.fingerprint)
    .bind(&key.user)
    .bind(&key.public_key)
    .bind(&key.comment)
    .bind(&key.created_at)
    .execute(&mut **tx)
    .await
    .map_err(|e| taken(e, StoreError::Taken("SSH key", key.fingerprint.clone())))?;
    Ok(())
}
