//! The words of SPEC section 1 as types: ids, run types, statuses and the
//! pure rules that decide a run's outcome. Nothing here does I/O.

mod ids;
mod run;
mod token;

pub use ids::{DedupKey, IdError, ItemId, RunId, TenantId};
pub use run::{
    Counts, ItemError, ItemRecord, ItemStatus, RunRecord, RunStatus, RunType, SafeError,
    SafeErrorCode, Timestamp, UnknownValue, now,
};
pub use token::{TokenRecord, TokenScope};
