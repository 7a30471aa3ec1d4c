//! API tokens: what a token reaches, and its record (never the token itself).

use super::{TenantId, Timestamp};

/// The tenants a token reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScope {
    /// Every tenant (the admin token, and admin-scope stored tokens).
    AllTenants,
    /// Only these tenants.
    Tenants(Vec<TenantId>),
}

impl TokenScope {
    pub fn reaches(&self, tenant: &TenantId) -> bool {
        match self {
            TokenScope::AllTenants => true,
            TokenScope::Tenants(tenants) => tenants.contains(tenant),
        }
    }
}

/// A stored token as listed: everything but the token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// The handle used to revoke it (a UUID v7).
    pub id: String,
    pub label: Option<String>,
    pub scope: TokenScope,
    pub created_at: Timestamp,
    /// Updated at most once a minute, so that checking a token stays a read.
    pub last_used_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}
