//! Supervising item attempts: a global permit and a run slot per attempt,
//! the attempt as a child task (a panic or a timeout is a failed attempt),
//! retries with exponential backoff and full jitter, and the tenant's
//! throttle pause (a 429 pauses every run of the tenant; see `throttle.rs`).

use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;
use rand::Rng;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::{FAILED_IDS_IN_CONTEXT, Phase, RunActor};
use crate::domain::{ItemError, ItemId, now};
use crate::runtime::executor::{AttemptError, ItemRequest};
use crate::store::ItemOutcome;

/// How one attempt ended, as the supervisor sees it.
enum Ended {
    Succeeded,
    Failed(AttemptError),
    /// Aborted by a stop or by shutdown: no outcome to record.
    Aborted,
}

impl RunActor {
    /// Starts attempts while the run has a free slot and items ready, one
    /// global permit at a time (so runs of every tenant take turns).
    pub(super) fn fill_slots(&mut self, ctx: &mut Context<Self>) {
        let has_room = self.in_flight.len() < self.settings.concurrency as usize;
        if self.phase != Phase::Executing
            || self.acquiring
            || !has_room
            || self.ready.is_empty()
            || self.stopped.is_some()
            || self.shared.shutdown.is_cancelled()
        {
            return;
        }
        if let Some(wait) = self.throttle.remaining() {
            // The tenant is throttled: look again when the pause ends.
            if !self.wake_scheduled {
                self.wake_scheduled = true;
                ctx.run_later(wait, |act, ctx| {
                    act.wake_scheduled = false;
                    act.fill_slots(ctx);
                });
            }
            return;
        }
        self.acquiring = true;
        let permits = self.shared.permits.clone();
        let shutdown = self.shared.shutdown.clone();
        let stop = self.stop.clone();
        let acquire = async move {
            tokio::select! {
                permit = permits.acquire_owned() => permit.ok(),
                () = shutdown.cancelled() => None,
                () = stop.cancelled() => None,
            }
        };
        ctx.spawn(acquire.into_actor(self).map(|permit, act, ctx| {
            act.acquiring = false;
            if let Some(permit) = permit {
                act.start_attempt(permit, ctx);
            }
        }));
    }

    /// Commits the item as running with its next attempt number, then runs it.
    fn start_attempt(&mut self, permit: OwnedSemaphorePermit, ctx: &mut Context<Self>) {
        if self.stopped.is_some() || self.shared.shutdown.is_cancelled() {
            return;
        }
        if self.throttle.remaining().is_some() {
            // Paused while this permit was awaited: give it back and wait.
            drop(permit);
            return self.fill_slots(ctx);
        }
        let Some(item) = self.ready.pop_front() else {
            return;
        };
        let attempt = self.attempts.get(&item).copied().unwrap_or(0) + 1;
        let abort = self.stop.child_token();
        self.in_flight.insert(item.clone(), abort.clone());
        let (id, epoch) = (self.record.id, self.record.epoch);
        let tracked = self.shared.tracker.token();
        let write_item = item.clone();
        self.persist(
            ctx,
            move |store| {
                let items = vec![(write_item.clone(), attempt)];
                async move { store.start_items(id, epoch, items, now()).await }.boxed()
            },
            move |act, (), ctx| {
                act.attempts.insert(item.clone(), attempt);
                act.run_attempt(item, attempt, permit, tracked, ctx);
            },
        );
        self.fill_slots(ctx);
    }

    /// Runs the attempt as a child task and supervises its end.
    fn run_attempt(
        &mut self,
        item: ItemId,
        attempt: u32,
        permit: OwnedSemaphorePermit,
        tracked: TaskTrackerToken,
        ctx: &mut Context<Self>,
    ) {
        let abort = match self.in_flight.get(&item) {
            Some(token) => token.clone(),
            None => return,
        };
        let request = ItemRequest {
            run: self.plan_request(),
            item_id: item.clone(),
            attempt,
        };
        let executor = self.executor.clone();
        let timeout = self.settings.item_timeout.0;
        let run_type = self.record.run_type.as_str();
        let began = std::time::Instant::now();
        // Even the executor's synchronous part runs in the child task, so
        // that any panic of it is the child's.
        let child = actix::spawn(async move {
            tokio::select! {
                result = tokio::time::timeout(timeout, executor.execute(request)) => Some(result),
                () = abort.cancelled() => None,
            }
        });
        let supervise = async move {
            let ended = match child.await {
                Ok(Some(Ok(Ok(())))) => Ended::Succeeded,
                Ok(Some(Ok(Err(error)))) => Ended::Failed(error),
                Ok(Some(Err(_elapsed))) => Ended::Failed(AttemptError::Retryable {
                    error: ItemError::new("timeout").with("timeoutMs", timeout.as_millis() as u64),
                    retry_after: None,
                }),
                Ok(None) => Ended::Aborted,
                Err(joined) if joined.is_panic() => Ended::Failed(AttemptError::Retryable {
                    error: ItemError::new("executor_panicked"),
                    retry_after: None,
                }),
                Err(_) => Ended::Aborted,
            };
            drop(permit);
            let outcome = match &ended {
                Ended::Succeeded => "succeeded",
                Ended::Failed(AttemptError::Throttled { .. }) => "throttled",
                Ended::Failed(AttemptError::Retryable { .. } | AttemptError::Permanent(_)) => {
                    "failed"
                }
                Ended::Aborted => "aborted",
            };
            metrics::counter!("runpilot_item_attempts_total", "type" => run_type, "outcome" => outcome)
                .increment(1);
            metrics::histogram!("runpilot_item_attempt_seconds", "type" => run_type)
                .record(began.elapsed().as_secs_f64());
            ended
        };
        ctx.spawn(
            supervise
                .into_actor(self)
                .map(move |ended, act, ctx| act.attempt_ended(item, attempt, ended, tracked, ctx)),
        );
    }

    /// Records an attempt's outcome, then frees its slot.
    fn attempt_ended(
        &mut self,
        item: ItemId,
        attempt: u32,
        ended: Ended,
        tracked: TaskTrackerToken,
        ctx: &mut Context<Self>,
    ) {
        let (id, epoch) = (self.record.id, self.record.epoch);
        let throttled_before = self.throttled.get(&item).copied().unwrap_or(0);
        // Throttled attempts do not use up `max_attempts`.
        let counted = attempt.saturating_sub(throttled_before);
        let outcome = match ended {
            Ended::Aborted => {
                // The item stays `running` in the store: a stop cancels it
                // in the terminal write, a restart runs it again.
                self.in_flight.remove(&item);
                drop(tracked);
                self.fill_slots(ctx);
                return self.check_done(ctx);
            }
            Ended::Succeeded => {
                self.throttle.record_success();
                ItemOutcome::Succeeded
            }
            Ended::Failed(AttemptError::Throttled { error, retry_after })
                if self.stopped.is_none()
                    && throttled_before < self.settings.max_throttled_waits =>
            {
                // The whole tenant pauses; the item is ready again at once
                // and waits for the pause like every other item of the tenant.
                self.throttle.pause(
                    &self.record.tenant,
                    retry_after,
                    self.settings.throttle_cap.0,
                );
                return self.retry_later(item, error, true, Duration::ZERO, tracked, ctx);
            }
            Ended::Failed(AttemptError::Retryable { error, retry_after })
                if counted < self.settings.max_attempts && self.stopped.is_none() =>
            {
                let wait = self.backoff(counted, retry_after);
                tracing::debug!(run_id = %id, item = %item, attempt, code = %error.code, "attempt failed; retrying");
                return self.retry_later(item, error, false, wait, tracked, ctx);
            }
            Ended::Failed(error) => ItemOutcome::Failed(error.error().clone()),
        };
        let failed = matches!(outcome, ItemOutcome::Failed(_));
        let write_item = item.clone();
        self.persist(
            ctx,
            move |store| {
                let (item, outcome) = (write_item.clone(), outcome.clone());
                async move { store.finish_item(id, epoch, item, outcome, now()).await }.boxed()
            },
            move |act, run, ctx| {
                if let Some(run) = run {
                    act.adopt(run);
                }
                if failed && act.failed_ids.len() < FAILED_IDS_IN_CONTEXT {
                    act.failed_ids.push(item.clone());
                }
                act.in_flight.remove(&item);
                drop(tracked);
                act.fill_slots(ctx);
                act.check_done(ctx);
            },
        );
    }

    /// Commits the failed attempt (the item waits as `pending`), frees the
    /// slot, and makes the item ready again after `wait`.
    fn retry_later(
        &mut self,
        item: ItemId,
        error: ItemError,
        throttled: bool,
        wait: Duration,
        tracked: TaskTrackerToken,
        ctx: &mut Context<Self>,
    ) {
        let (id, epoch) = (self.record.id, self.record.epoch);
        let write_item = item.clone();
        self.persist(
            ctx,
            move |store| {
                let (item, error) = (write_item.clone(), error.clone());
                async move {
                    store
                        .retry_item(id, epoch, item, error, throttled, now())
                        .await
                }
                .boxed()
            },
            move |act, (), ctx| {
                act.in_flight.remove(&item);
                if throttled {
                    *act.throttled.entry(item.clone()).or_default() += 1;
                }
                act.backing_off += 1;
                drop(tracked);
                ctx.run_later(wait, move |act, ctx| {
                    act.backing_off -= 1;
                    if act.stopped.is_none() {
                        act.ready.push_front(item);
                    }
                    act.fill_slots(ctx);
                    act.check_done(ctx);
                });
                act.fill_slots(ctx);
            },
        );
    }

    /// The wait before attempt `attempt + 1`: the worker's `Retry-After`
    /// when it gave one (capped), else full jitter over an exponential ceiling.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let cap = self.settings.retry_cap.0;
        if let Some(hint) = retry_after {
            return hint.min(cap);
        }
        let ceiling = self
            .settings
            .retry_base
            .0
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(cap);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }
}
