//! Secrets: values (API keys, tokens) an organization stores encrypted on the host, by name.
//! No answer of the API ever carries a value.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The largest secret value, in bytes of UTF-8.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// Body of `PUT /v1/secrets/{secret}`. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecretRequest {
    /// The value: 1 to 65536 bytes of UTF-8. It is stored encrypted and never shown again.
    #[schema(min_length = 1)]
    pub value: String,
}

impl std::fmt::Debug for SetSecretRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecretRequest")
            .field("value", &"[redacted]")
            .finish()
    }
}

/// A secret as listed: its name and history, never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretInfo {
    /// `^[A-Z][A-Z0-9_]{0,63}$`, as an environment variable's name.
    pub name: String,
    /// The organization it belongs to.
    pub org: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The principal that first set it.
    pub created_by: String,
    /// RFC 3339, UTC: when its value was last set.
    pub updated_at: String,
}

/// The answer of `POST /v1/secrets/rotate-master-key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RotatedMasterKey {
    /// The new master key's id (16 hex digits derived from the key; not the key).
    pub key_id: String,
    /// How many secrets were re-encrypted under it.
    pub secrets: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_never_prints_its_value() {
        let r = SetSecretRequest {
            value: "hunter2".into(),
        };
        assert!(!format!("{r:?}").contains("hunter2"));
        assert!(!format!("{r:#?}").contains("hunter2"));
    }
}
