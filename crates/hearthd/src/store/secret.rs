//! Secrets as stored (see the migration): ciphertext, nonce and the id of the master key that
//! sealed them, per organization and name. The store never sees a value; `crate::secrets`
//! seals and opens them.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError};

/// A sealed value: what `crate::secrets` makes of a value and the store keeps.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub nonce: Vec<u8>,
    /// The id of the master key it was sealed with.
    pub key_id: String,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("ciphertext_bytes", &self.ciphertext.len())
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A secret's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRecord {
    pub org: String,
    pub name: String,
    pub sealed: Sealed,
    pub created_at: String,
    pub created_by: String,
    pub updated_at: String,
}

fn secret_from_row(r: &AnyRow) -> Result<SecretRecord, StoreError> {
    Ok(SecretRecord {
        org: r.try_get("org")?,
        name: r.try_get("name")?,
        sealed: Sealed {
            ciphertext: r.try_get("ciphertext")?,
            nonce: r.try_get("nonce")?,
            key_id: r.try_get("key_id")?,
        },
        created_at: r.try_get("created_at")?,
        created_by: r.try_get("created_by")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl Store {
    /// Stores `secret`, or replaces the value (and `updated_at`) of the one of its organization
    /// and name, keeping when and by whom it was first set. Returns the row as stored and
    /// whether it is new. The organization must exist.
    pub async fn put_secret(
        &self,
        secret: &SecretRecord,
    ) -> Result<(SecretRecord, bool), StoreError> {
        let mut tx = self.backend.begin_write(&self.pool).await?;
        if sqlx::query("SELECT name FROM orgs WHERE name = $1")
            .bind(&secret.org)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NoOrg(secret.org.clone()));
        }
        let existing = sqlx::query(&format!(
            "SELECT created_at, created_by FROM secrets WHERE org = $1 AND name = $2{}",
            self.backend.lock_clause()
        ))
        .bind(&secret.org)
        .bind(&secret.name)
        .fetch_optional(&mut *tx)
        .await?;
        let mut stored = secret.clone();
        let created = match existing {
            Some(row) => {
                stored.created_at = row.try_get("created_at")?;
                stored.created_by = row.try_get("created_by")?;
                sqlx::query(
                    "UPDATE secrets SET ciphertext = $1, nonce = $2, key_id = $3, updated_at = $4
                     WHERE org = $5 AND name = $6",
                )
                .bind(&secret.sealed.ciphertext)
                .bind(&secret.sealed.nonce)
                .bind(&secret.sealed.key_id)
                .bind(&secret.updated_at)
                .bind(&secret.org)
                .bind(&secret.name)
                .execute(&mut *tx)
                .await?;
                false
            }
            None => {
                sqlx::query(
                    "INSERT INTO secrets (org, name, ciphertext, nonce, key_id, created_at, created_by, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&secret.org)
                .bind(&secret.name)
                .bind(&secret.sealed.ciphertext)
                .bind(&secret.sealed.nonce)
                .bind(&secret.sealed.key_id)
                .bind(&secret.created_at)
                .bind(&secret.created_by)
                .bind(&secret.updated_at)
                .execute(&mut *tx)
                .await?;
                true
            }
        };
        tx.commit().await?;
        Ok((stored, created))
    }

    pub async fn get_secret(
        &self,
        org: &str,
        name: &str,
    ) -> Result<Option<SecretRecord>, StoreError> {
        sqlx::query("SELECT * FROM secrets WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| secret_from_row(&r))
            .transpose()
    }

    /// The secrets of `org`, by name.
    pub async fn list_secrets(&self, org: &str) -> Result<Vec<SecretRecord>, StoreError> {
        sqlx::query("SELECT * FROM secrets WHERE org = $1 ORDER BY name")
            .bind(org)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(secret_from_row)
            .collect()
    }

    /// Deletes a secret; false when there was none.
    pub async fn delete_secret(&self, org: &str, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM secrets WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// How many secrets each master key id sealed.
    pub async fn secret_key_ids(&self) -> Result<Vec<(String, u64)>, StoreError> {
        sqlx::query("SELECT key_id, COUNT(*) AS n FROM secrets GROUP BY key_id ORDER BY key_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                let n: i64 = r.try_get("n")?;
                Ok((r.try_get("key_id")?, n.unsigned_abs()))
            })
            .collect()
    }

    /// Replaces every secret's sealed value with what `reseal` makes of the row, in one
    /// transaction that locks what it reads: either every row changes or none does. Returns how
    /// many rows there were.
    pub async fn reseal_secrets<E: From<StoreError>>(
        &self,
        mut reseal: impl FnMut(&SecretRecord) -> Result<Sealed, E>,
    ) -> Result<u64, E> {
        let mut tx = self
            .backend
            .begin_write(&self.pool)
            .await
            .map_err(StoreError::from)?;
        let rows = sqlx::query(&format!(
            "SELECT * FROM secrets ORDER BY org, name{}",
            self.backend.lock_clause()
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let mut n = 0;
        for row in &rows {
            let record = secret_from_row(row)?;
            let sealed = reseal(&record)?;
            sqlx::query(
                "UPDATE secrets SET ciphertext = $1, nonce = $2, key_id = $3 WHERE org = $4 AND name = $5",
            )
            .bind(&sealed.ciphertext)
            .bind(&sealed.nonce)
            .bind(&sealed.key_id)
            .bind(&record.org)
            .bind(&record.name)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            n += 1;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(n)
    }
}
