//! Executors do an item's work. The `ItemExecutor` trait is the extension
//! point: `plan` lists a run's items when the start request named none, and
//! `execute` runs one attempt of one item. The built-in executors are chosen
//! per run type by the configuration.

mod http;
mod simulated;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::config::{Config, ExecutorKind};
use crate::domain::{ItemError, ItemId, RunId, RunType, TenantId};

pub use http::{HttpExecutor, HttpExecutorError};
pub use simulated::SimulatedExecutor;

/// What an executor knows of the run it plans.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub tenant: TenantId,
    pub run_type: RunType,
    pub run_id: RunId,
    pub target_object_id: Option<String>,
    pub payload_hash: Option<String>,
}

/// One attempt of one item. `idempotency_key()` is the same for every
/// attempt, so a worker can tell a repeat from new work.
#[derive(Debug, Clone)]
pub struct ItemRequest {
    pub run: PlanRequest,
    pub item_id: ItemId,
    /// 1 for the first attempt; continues across restarts.
    pub attempt: u32,
}

impl ItemRequest {
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.run.run_id, self.item_id)
    }
}

/// How an attempt failed, classed by what should happen next.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptError {
    /// Worth another attempt (after backoff, or after `retry_after` when
    /// the worker said so).
    Retryable {
        error: ItemError,
        retry_after: Option<Duration>,
    },
    /// The upstream said "too many requests" (HTTP 429). Kept apart from
    /// `Retryable` because SPEC 4.2 throttles per tenant: a 429 on any item
    /// is to pause the whole tenant's dispatch, and throttled attempts are
    /// not to use up `max_attempts`. Until that governor exists, the
    /// supervisor treats it exactly like `Retryable`.
    Throttled {
        error: ItemError,
        retry_after: Option<Duration>,
    },
    /// Would fail again: the item fails now.
    Permanent(ItemError),
}

impl AttemptError {
    pub fn error(&self) -> &ItemError {
        match self {
            AttemptError::Retryable { error, .. }
            | AttemptError::Throttled { error, .. }
            | AttemptError::Permanent(error) => error,
        }
    }
}

/// Does the work of one run type.
pub trait ItemExecutor: Send + Sync + 'static {
    /// Lists the items of a run started without `itemIds`. An error fails
    /// the run with `plan_failed` and the error's safe context.
    fn plan(&self, request: PlanRequest) -> BoxFuture<'static, Result<Vec<ItemId>, ItemError>>;

    /// Runs one attempt of one item. Dropping the future aborts the attempt.
    fn execute(&self, request: ItemRequest) -> BoxFuture<'static, Result<(), AttemptError>>;
}

/// The executor of each run type.
#[derive(Clone)]
pub struct Executors {
    by_type: HashMap<RunType, Arc<dyn ItemExecutor>>,
}

impl Executors {
    /// The executors the configuration names.
    pub fn from_config(config: &Config) -> Self {
        let by_type = RunType::ALL
            .iter()
            .map(|&run_type| {
                let settings = config.run_type(run_type);
                let executor: Arc<dyn ItemExecutor> = match settings.executor {
                    ExecutorKind::Simulated => {
                        Arc::new(SimulatedExecutor::new(settings.delay.0, settings.items))
                    }
                    ExecutorKind::Http => match HttpExecutor::new(&settings) {
                        Ok(http) => Arc::new(http),
                        // Only a config built in code (not loaded, so not
                        // validated) gets here: its runs fail with
                        // `executor_unavailable` rather than pretending.
                        Err(error) => {
                            tracing::error!(
                                run_type = run_type.as_str(),
                                %error,
                                "the http executor cannot be built"
                            );
                            Arc::new(Unavailable)
                        }
                    },
                };
                (run_type, executor)
            })
            .collect();
        Self { by_type }
    }

    /// Replaces one run type's executor (library users compile in their own).
    pub fn set(&mut self, run_type: RunType, executor: Arc<dyn ItemExecutor>) {
        self.by_type.insert(run_type, executor);
    }

    pub fn get(&self, run_type: RunType) -> Arc<dyn ItemExecutor> {
        self.by_type
            .get(&run_type)
            .cloned()
            .unwrap_or_else(|| Arc::new(Unavailable))
    }
}

/// An executor that is configured but cannot run here: the fallback for a
/// run type without an executor, or whose http executor could not be built.
struct Unavailable;

impl ItemExecutor for Unavailable {
    fn plan(&self, _: PlanRequest) -> BoxFuture<'static, Result<Vec<ItemId>, ItemError>> {
        Box::pin(async { Err(ItemError::new("executor_unavailable")) })
    }

    fn execute(&self, _: ItemRequest) -> BoxFuture<'static, Result<(), AttemptError>> {
        Box::pin(async {
            Err(AttemptError::Permanent(ItemError::new(
                "executor_unavailable",
            )))
        })
    }
}
