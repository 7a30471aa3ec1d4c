//! Rows to records, shared by both backends: the columns are the same on
//! SQLite and PostgreSQL, only the row type differs, so the decoding (and
//! what counts as a corrupt value) is written once.

use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use super::StoreError;
use crate::domain::{
    Counts, ItemError, ItemId, ItemRecord, RunId, RunRecord, SafeError, TenantId, Timestamp,
    TokenRecord, TokenScope,
};

/// The columns `run_from_row` reads, in the order both backends select them.
pub(super) const RUN_COLUMNS: &str = "id, tenant, run_type, target_object_id, payload_hash, \
     status, planned, total, succeeded, failed, safe_error_code, safe_error_context, \
     cancel_requested, created_at, started_at, finished_at, updated_at, epoch";

/// The columns `item_from_row` reads.
pub(super) const ITEM_COLUMNS: &str = "item_id, status, attempts, throttled, last_error_code, \
     last_error_context, started_at, finished_at";

/// The columns `token_from_row` reads (and `token_hash`).
pub(super) const TOKEN_COLUMNS: &str =
    "id, token_hash, label, all_tenants, tenants, created_at, last_used_at, revoked_at";

/// The few column shapes the store uses, read by name from either backend's
/// row. A trait rather than sqlx's generic bounds keeps the decoding
/// functions below free of a wall of `Decode`/`Type` clauses.
pub(super) trait Columns {
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn maybe_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    fn maybe_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error>;
    /// SQLite keeps flags as 0/1 integers, PostgreSQL as `BOOLEAN`; sqlx
    /// decodes both into `bool`.
    fn flag(&self, column: &str) -> Result<bool, sqlx::Error>;
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, column: &str) -> Result<String, sqlx::Error> {
                self.try_get(column)
            }
            fn maybe_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
                self.try_get(column)
            }
            fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
                self.try_get(column)
            }
            fn maybe_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error> {
                self.try_get(column)
            }
            fn flag(&self, column: &str) -> Result<bool, sqlx::Error> {
                self.try_get(column)
            }
        }
    };
}

columns_for!(SqliteRow);
columns_for!(PgRow);

pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn context(raw: Option<String>) -> Result<Map<String, Value>, StoreError> {
    match raw {
        None => Ok(Map::new()),
        Some(text) => match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(corrupt("context", "not an object")),
            Err(e) => Err(corrupt("context", e)),
        },
    }
}

pub(super) fn count(row: &impl Columns, column: &str) -> Result<u64, StoreError> {
    u64::try_from(row.int(column)?).map_err(|e| corrupt(column, e))
}

fn time(row: &impl Columns, column: &str) -> Result<Option<Timestamp>, StoreError> {
    Ok(row.maybe_int(column)?.map(Timestamp::from_millis))
}

pub(super) fn run_from_row(row: &impl Columns) -> Result<RunRecord, StoreError> {
    let safe_error = match row.maybe_text("safe_error_code")? {
        Some(code) => Some(SafeError::new(
            code.parse().map_err(|e| corrupt("safe_error_code", e))?,
            context(row.maybe_text("safe_error_context")?)?,
        )),
        None => None,
    };
    Ok(RunRecord {
        id: RunId::parse(&row.text("id")?).map_err(|e| corrupt("id", e))?,
        tenant: TenantId::parse(&row.text("tenant")?).map_err(|e| corrupt("tenant", e))?,
        run_type: row
            .text("run_type")?
            .parse()
            .map_err(|e| corrupt("run_type", e))?,
        target_object_id: row.maybe_text("target_object_id")?,
        payload_hash: row.maybe_text("payload_hash")?,
        status: row
            .text("status")?
            .parse()
            .map_err(|e| corrupt("status", e))?,
        counts: Counts {
            total: count(row, "total")?,
            succeeded: count(row, "succeeded")?,
            failed: count(row, "failed")?,
        },
        safe_error,
        cancel_requested: row.flag("cancel_requested")?,
        planned: row.flag("planned")?,
        created_at: Timestamp::from_millis(row.int("created_at")?),
        started_at: time(row, "started_at")?,
        finished_at: time(row, "finished_at")?,
        updated_at: Timestamp::from_millis(row.int("updated_at")?),
        throttled_until: None,
        epoch: count(row, "epoch")?,
    })
}

pub(super) fn item_from_row(row: &impl Columns) -> Result<ItemRecord, StoreError> {
    let last_error = match row.maybe_text("last_error_code")? {
        Some(code) => Some(ItemError {
            code,
            context: context(row.maybe_text("last_error_context")?)?,
        }),
        None => None,
    };
    Ok(ItemRecord {
        item_id: ItemId::parse(&row.text("item_id")?).map_err(|e| corrupt("item_id", e))?,
        status: row
            .text("status")?
            .parse()
            .map_err(|e| corrupt("item status", e))?,
        attempts: u32::try_from(row.int("attempts")?).map_err(|e| corrupt("attempts", e))?,
        throttled: u32::try_from(row.int("throttled")?).map_err(|e| corrupt("throttled", e))?,
        last_error,
        started_at: time(row, "started_at")?,
        finished_at: time(row, "finished_at")?,
    })
}

pub(super) fn token_from_row(row: &impl Columns) -> Result<TokenRecord, StoreError> {
    let scope = if row.flag("all_tenants")? {
        TokenScope::AllTenants
    } else {
        let names: Vec<String> =
            serde_json::from_str(&row.text("tenants")?).map_err(|e| corrupt("tenants", e))?;
        TokenScope::Tenants(
            names
                .iter()
                .map(|n| TenantId::parse(n).map_err(|e| corrupt("tenants", e)))
                .collect::<Result<_, _>>()?,
        )
    };
    Ok(TokenRecord {
        id: row.text("id")?,
        label: row.maybe_text("label")?,
        scope,
        created_at: Timestamp::from_millis(row.int("created_at")?),
        last_used_at: time(row, "last_used_at")?,
        revoked_at: time(row, "revoked_at")?,
    })
}

pub(super) fn renewed_from_row(row: &impl Columns) -> Result<super::Renewed, StoreError> {
    Ok(super::Renewed {
        tenant: TenantId::parse(&row.text("tenant")?).map_err(|e| corrupt("tenant", e))?,
        id: RunId::parse(&row.text("id")?).map_err(|e| corrupt("id", e))?,
        cancel_requested: row.flag("cancel_requested")?,
    })
}
