//! Run and item state: the closed enums of SPEC 3.2 and the pure rules that
//! decide a run's terminal status from its counts.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde_json::{Map, Value};

use super::{ItemId, RunId, TenantId};

/// A value from outside that is not one of a closed enum's names; the
/// message lists the valid ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{given}' is not one of: {valid}")]
pub struct UnknownValue {
    pub given: String,
    pub valid: String,
}

/// Declares a closed enum with its wire/database names, `as_str`, `ALL` and
/// a `FromStr` whose error lists the valid values.
macro_rules! closed_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    other => Err(UnknownValue {
                        given: other.to_owned(),
                        valid: [$($wire),+].join(", "),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

closed_enum!(
    /// The kinds of operation runpilot runs (the seed's `runType` enum).
    RunType {
        BackupSetAddPolicies => "backup_set_add_policies",
        RestoreExecute => "restore_execute",
        RestorePreview => "restore_preview",
        SnapshotCapture => "snapshot_capture",
    }
);

closed_enum!(
    /// A run's status (the seed's enum; a canceled run ends `failed` or `partial`).
    RunStatus {
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Partial => "partial",
    }
);

closed_enum!(
    /// An item's status within its run.
    ItemStatus {
        Pending => "pending",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Canceled => "canceled",
    }
);

closed_enum!(
    /// The stable machine codes of a run's `safeError`.
    SafeErrorCode {
        AllItemsFailed => "all_items_failed",
        SomeItemsFailed => "some_items_failed",
        PlanFailed => "plan_failed",
        DeadlineExceeded => "deadline_exceeded",
        ExecutorUnavailable => "executor_unavailable",
        Canceled => "canceled",
    }
);

impl RunStatus {
    /// `queued` or `running`: the statuses the dedup key is unique among.
    pub fn is_active(self) -> bool {
        match self {
            RunStatus::Queued | RunStatus::Running => true,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Partial => false,
        }
    }

    pub fn is_terminal(self) -> bool {
        !self.is_active()
    }
}

impl ItemStatus {
    pub fn is_terminal(self) -> bool {
        match self {
            ItemStatus::Pending | ItemStatus::Running => false,
            ItemStatus::Succeeded | ItemStatus::Failed | ItemStatus::Canceled => true,
        }
    }
}

/// A point in time, UTC, with millisecond precision (the wire's precision,
/// so what is stored is exactly what is reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(DateTime<Utc>);

/// The current time, cut to milliseconds.
pub fn now() -> Timestamp {
    Timestamp::from_millis(Utc::now().timestamp_millis())
}

impl Timestamp {
    pub fn from_millis(ms: i64) -> Self {
        Self(
            Utc.timestamp_millis_opt(ms)
                .single()
                .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
        )
    }

    pub fn as_millis(self) -> i64 {
        self.0.timestamp_millis()
    }

    pub fn to_rfc3339(self) -> String {
        self.0.to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// A run's progress. `succeeded + failed <= total` always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
}

impl Counts {
    pub fn done(&self) -> u64 {
        self.succeeded + self.failed
    }
}

/// A failure explained with nothing secret in it: a stable code and a small
/// context (counts, item ids, an upstream status).
#[derive(Debug, Clone, PartialEq)]
pub struct SafeError {
    pub code: SafeErrorCode,
    pub context: Map<String, Value>,
}

impl SafeError {
    pub fn new(code: SafeErrorCode, context: Map<String, Value>) -> Self {
        Self { code, context }
    }

    /// The terminal status and safeError of a run whose items all reached a
    /// terminal status, or that was stopped early (`stopped` says why, and
    /// `canceled_items` how many items never finished).
    pub fn decide(
        counts: Counts,
        stopped: Option<(SafeErrorCode, u64)>,
        first_failed: &[ItemId],
    ) -> (RunStatus, Option<SafeError>) {
        let mut context = Map::new();
        context.insert("total".into(), counts.total.into());
        context.insert("succeeded".into(), counts.succeeded.into());
        context.insert("failed".into(), counts.failed.into());
        if !first_failed.is_empty() {
            context.insert(
                "failedItemIds".into(),
                first_failed
                    .iter()
                    .map(|i| Value::from(i.as_str()))
                    .collect(),
            );
        }
        if let Some((code, canceled)) = stopped {
            context.insert("canceledItems".into(), canceled.into());
            let status = if counts.succeeded > 0 {
                RunStatus::Partial
            } else {
                RunStatus::Failed
            };
            return (status, Some(SafeError::new(code, context)));
        }
        match (counts.succeeded, counts.failed) {
            (_, 0) => (RunStatus::Succeeded, None),
            (0, _) => (
                RunStatus::Failed,
                Some(SafeError::new(SafeErrorCode::AllItemsFailed, context)),
            ),
            _ => (
                RunStatus::Partial,
                Some(SafeError::new(SafeErrorCode::SomeItemsFailed, context)),
            ),
        }
    }
}

/// Why one attempt of an item failed: a stable code and a safe context.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemError {
    pub code: String,
    pub context: Map<String, Value>,
}

impl ItemError {
    pub fn new(code: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            context: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.context.insert(key.to_owned(), value.into());
        self
    }
}

/// A run as committed to the store (and as reported).
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: RunId,
    pub tenant: TenantId,
    pub run_type: RunType,
    pub target_object_id: Option<String>,
    pub payload_hash: Option<String>,
    pub status: RunStatus,
    pub counts: Counts,
    pub safe_error: Option<SafeError>,
    /// A cancel was asked for and the run has not ended yet.
    pub cancel_requested: bool,
    /// Items are known (given at start, or planned); `counts.total` is final.
    pub planned: bool,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub updated_at: Timestamp,
    /// While the tenant's dispatch is paused by an upstream throttle: when
    /// the pause ends. Live only (from the run's actor), never stored.
    pub throttled_until: Option<Timestamp>,
    /// The ownership epoch: raised at every takeover; a node writes the
    /// run's state only while the stored epoch is the one it holds.
    pub epoch: u64,
}

impl RunRecord {
    pub fn dedup_key(&self) -> super::DedupKey {
        super::DedupKey {
            run_type: self.run_type,
            target_object_id: self.target_object_id.clone(),
            payload_hash: self.payload_hash.clone(),
        }
    }
}

/// One item of a run as committed to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRecord {
    pub item_id: ItemId,
    pub status: ItemStatus,
    /// Attempts started so far (the next attempt is `attempts + 1`).
    pub attempts: u32,
    /// Of those, attempts the upstream throttled (429); they do not count
    /// toward `max_attempts`.
    pub throttled: u32,
    pub last_error: Option<ItemError>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(total: u64, succeeded: u64, failed: u64) -> Counts {
        Counts {
            total,
            succeeded,
            failed,
        }
    }

    #[test]
    fn outcomes_follow_the_status_rules() {
        let (s, e) = SafeError::decide(counts(3, 3, 0), None, &[]);
        assert_eq!((s, e), (RunStatus::Succeeded, None));
        let (s, _) = SafeError::decide(counts(0, 0, 0), None, &[]);
        assert_eq!(s, RunStatus::Succeeded);
        let (s, e) = SafeError::decide(counts(3, 1, 2), None, &[]);
        assert_eq!(s, RunStatus::Partial);
        assert_eq!(e.unwrap().code, SafeErrorCode::SomeItemsFailed);
        let (s, e) = SafeError::decide(counts(2, 0, 2), None, &[]);
        assert_eq!(s, RunStatus::Failed);
        assert_eq!(e.unwrap().code, SafeErrorCode::AllItemsFailed);
        let (s, e) = SafeError::decide(counts(5, 1, 0), Some((SafeErrorCode::Canceled, 4)), &[]);
        assert_eq!(s, RunStatus::Partial);
        assert_eq!(e.unwrap().context["canceledItems"], 4);
    }

    #[test]
    fn enums_parse_their_wire_names_and_list_them_on_error() {
        for t in RunType::ALL {
            assert_eq!(t.as_str().parse::<RunType>(), Ok(*t));
        }
        let err = "backup".parse::<RunType>().unwrap_err();
        assert!(err.to_string().contains("snapshot_capture"));
    }

    #[test]
    fn timestamps_print_milliseconds_in_utc() {
        assert_eq!(
            Timestamp::from_millis(1_796_412_366_123).to_rfc3339(),
            "2026-12-04T19:26:06.123Z"
        );
    }
}
