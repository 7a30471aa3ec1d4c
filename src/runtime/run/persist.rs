//! Persist, then change memory: the one way a `RunActor` writes.

use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;

use super::RunActor;
use crate::store::{Store, StoreError};

/// The longest wait between tries of a write the store refused.
const MAX_WRITE_RETRY: Duration = Duration::from_secs(5);

impl RunActor {
    /// Runs `write` against the store; only after it committed, `then`
    /// changes the actor. A failed write leaves the actor as it was and is
    /// tried again later (the store may be briefly away), so an outcome is
    /// never lost and never reported before it is stored.
    pub(super) fn persist<T, W, F>(&mut self, ctx: &mut Context<Self>, write: W, then: F)
    where
        T: 'static,
        W: Fn(Store) -> BoxFuture<'static, Result<T, StoreError>> + 'static,
        F: FnOnce(&mut Self, T, &mut Context<Self>) + 'static,
    {
        self.persist_try(ctx, write, then, 0);
    }

    fn persist_try<T, W, F>(&mut self, ctx: &mut Context<Self>, write: W, then: F, failures: u32)
    where
        T: 'static,
        W: Fn(Store) -> BoxFuture<'static, Result<T, StoreError>> + 'static,
        F: FnOnce(&mut Self, T, &mut Context<Self>) + 'static,
    {
        let pending = write(self.shared.store.clone());
        ctx.spawn(pending.into_actor(self).map(move |result, act, ctx| match result {
            Ok(value) => then(act, value, ctx),
            // Another node took the run over: stop, write nothing more.
            Err(StoreError::Fenced) => act.relinquish(ctx),
            Err(error) => {
                let wait = Duration::from_millis(100 * 2u64.pow(failures.min(6))).min(MAX_WRITE_RETRY);
                tracing::warn!(
                    run_id = %act.record.id, error = %error, retry_in_ms = wait.as_millis() as u64,
                    "a run transition could not be stored; trying again"
                );
                ctx.run_later(wait, move |act, ctx| {
                    act.persist_try(ctx, write, then, failures + 1)
                });
            }
        }));
    }
}
