//! Id newtypes, each parsed once at the edge and trusted afterwards.

use std::fmt;

use uuid::Uuid;

use super::RunType;

/// Why an id from outside was refused; the message is safe to show a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(pub String);

/// A tenant's external id: 1-128 chars of `[A-Za-z0-9._-]`, never `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let well_formed = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && raw != "."
            && raw != "..";
        if well_formed {
            Ok(Self(raw.to_owned()))
        } else {
            Err(IdError(
                "tenant ids are 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-' (not '.' or '..')"
                    .to_owned(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A run's id: a UUID v7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(Uuid);

impl RunId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        Uuid::parse_str(raw)
            .map(Self)
            .map_err(|_| IdError("run ids are UUID strings".to_owned()))
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// One unit of a run's work: 1-256 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(String);

impl ItemId {
    pub const MAX_LEN: usize = 256;

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let chars = raw.chars().count();
        if (1..=Self::MAX_LEN).contains(&chars) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(IdError("item ids are 1-256 characters".to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What makes two starts "the same run" within one tenant: the run type,
/// the target and the payload hash. Null and absent are the same value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub run_type: RunType,
    pub target_object_id: Option<String>,
    pub payload_hash: Option<String>,
}

impl DedupKey {
    /// The key as stored in the database's unique index: an unambiguous
    /// encoding in which a missing value differs from every string.
    pub fn storage_key(&self) -> String {
        serde_json::json!([self.target_object_id, self.payload_hash]).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_refuse_dots_alone_and_foreign_characters() {
        assert!(TenantId::parse("contoso.onmicrosoft.com").is_ok());
        assert!(TenantId::parse("a_b-C.9").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "ä", &"x".repeat(129)] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(TenantId::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn item_ids_are_one_to_256_characters() {
        assert!(ItemId::parse("").is_err());
        assert!(ItemId::parse(&"é".repeat(256)).is_ok());
        assert!(ItemId::parse(&"x".repeat(257)).is_err());
    }

    #[test]
    fn storage_keys_tell_null_from_the_string_null() {
        let key = |t: Option<&str>| DedupKey {
            run_type: RunType::SnapshotCapture,
            target_object_id: t.map(str::to_owned),
            payload_hash: None,
        };
        assert_ne!(key(None).storage_key(), key(Some("null")).storage_key());
        assert_ne!(key(Some("")).storage_key(), key(None).storage_key());
    }
}
