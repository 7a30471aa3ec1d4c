//! Who may call the API: the configured admin token (every tenant) and
//! tokens stored in the database, hashed, each reaching the tenants it was
//! made for. A token is checked against the store on every request, so a
//! revocation holds from the next request on, on every node.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{TokenRecord, TokenScope, now};
use crate::store::{NewToken, Store, StoreError};

/// Every token runpilot makes starts with this, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "rp_";
/// Random bytes in a token (256 bits).
const TOKEN_BYTES: usize = 32;
/// `last_used_at` is written at most this often per token, in milliseconds.
const TOUCH_EVERY_MS: i64 = 60_000;

/// A new random token: `rp_` and 64 hex digits.
pub fn generate_token() -> String {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex(&bytes))
}

/// The hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks presented tokens; cheap to clone.
#[derive(Clone)]
pub struct AccessControl {
    /// SHA-256 of the configured admin token, if one is configured.
    admin_hash: Option<String>,
    store: Store,
}

impl AccessControl {
    pub fn new(admin_token: &str, store: Store) -> Self {
        Self {
            admin_hash: (!admin_token.is_empty()).then(|| hash_token(admin_token)),
            store,
        }
    }

    /// What the token reaches; `None` when it is unknown or revoked.
    pub async fn scope_of(&self, token: &str) -> Result<Option<TokenScope>, StoreError> {
        let presented = hash_token(token);
        if let Some(admin) = &self.admin_hash
            && bool::from(admin.as_bytes().ct_eq(presented.as_bytes()))
        {
            return Ok(Some(TokenScope::AllTenants));
        }
        let Some(stored) = self.store.token_by_hash(&presented).await? else {
            return Ok(None);
        };
        if !bool::from(stored.hash.as_bytes().ct_eq(presented.as_bytes()))
            || stored.record.revoked_at.is_some()
        {
            return Ok(None);
        }
        let at = now();
        let stale = stored
            .record
            .last_used_at
            .is_none_or(|last| at.as_millis() - last.as_millis() >= TOUCH_EVERY_MS);
        if stale {
            self.store.touch_token(&stored.record.id, at).await?;
        }
        Ok(Some(stored.record.scope))
    }

    /// Makes and stores a token; the token itself is returned once, here.
    pub async fn create_token(
        &self,
        scope: TokenScope,
        label: Option<String>,
    ) -> Result<(String, TokenRecord), StoreError> {
        let token = generate_token();
        let record = self
            .store
            .create_token(NewToken {
                id: uuid::Uuid::now_v7().to_string(),
                hash: hash_token(&token),
                label,
                scope,
                created_at: now(),
            })
            .await?;
        Ok((token, record))
    }

    /// At the first start with no admin token configured and no token ever
    /// stored, makes one admin-scope token and returns it (to be shown once).
    pub async fn create_first_token(&self) -> Result<Option<String>, StoreError> {
        if self.admin_hash.is_some() || self.store.count_tokens().await? > 0 {
            return Ok(None);
        }
        let (token, _) = self
            .create_token(TokenScope::AllTenants, Some("first start".into()))
            .await?;
        Ok(Some(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_hashed_to_hex() {
        let a = generate_token();
        let b = generate_token();
        assert!(a.starts_with("rp_") && a.len() == 3 + 64);
        assert_ne!(a, b);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
        assert!(!hash_token(&a).contains(&a[3..]));
    }
}
