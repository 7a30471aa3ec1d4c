//! The built-in executor for the embedded default and demos (SPEC 4.1).

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{AttemptError, ItemExecutor, ItemRequest, PlanRequest};
use crate::domain::{ItemError, ItemId};

/// Each item takes `delay`; an id containing `fail` fails for good, one
/// containing `flaky` fails its first attempt and then succeeds. Without
/// `itemIds` a run plans `items` ids `item-1` … `item-N`.
pub struct SimulatedExecutor {
    /// How long one attempt takes.
    delay: Duration,
    /// How many items a plan lists.
    items: u32,
}

impl SimulatedExecutor {
    pub fn new(delay: Duration, items: u32) -> Self {
        Self { delay, items }
    }
}

impl ItemExecutor for SimulatedExecutor {
    fn plan(&self, _: PlanRequest) -> BoxFuture<'static, Result<Vec<ItemId>, ItemError>> {
        let ids = (1..=self.items)
            .map(|n| ItemId::parse(&format!("item-{n}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ItemError::new("plan_invalid"));
        Box::pin(async move { ids })
    }

    fn execute(&self, request: ItemRequest) -> BoxFuture<'static, Result<(), AttemptError>> {
        let delay = self.delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let id = request.item_id.as_str();
            if id.contains("fail") {
                Err(AttemptError::Permanent(ItemError::new("simulated_failure")))
            } else if id.contains("flaky") && request.attempt == 1 {
                Err(AttemptError::Retryable {
                    error: ItemError::new("simulated_flake"),
                    retry_after: None,
                })
            } else {
                Ok(())
            }
        })
    }
}
