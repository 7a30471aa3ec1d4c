//! The tenant-wide throttle governor. Upstream APIs (Microsoft Graph among
//! them) throttle per tenant across every caller, so a 429 on any item of a
//! tenant pauses the dispatch of every run of that tenant until the
//! `Retry-After` has passed (or, without one, an exponential backoff with
//! jitter over the tenant's consecutive throttles). Other tenants go on.
//! The registry owns one per tenant and hands it to each of its runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::domain::{TenantId, Timestamp, now};

/// The pause after a first 429 without `Retry-After`; it doubles with each
/// consecutive one (equal jitter: at least half of it is always waited).
const FIRST_PAUSE: Duration = Duration::from_secs(1);

#[derive(Clone, Default)]
pub(crate) struct Throttle {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// Dispatch waits until then (monotonic clock).
    until: Option<Instant>,
    /// The same moment on the wall clock, for `throttledUntil`.
    until_wall: Option<Timestamp>,
    /// 429s since the tenant's last success, for the backoff.
    strikes: u32,
}

impl Throttle {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long dispatch must still wait, if it must.
    pub fn remaining(&self) -> Option<Duration> {
        let state = self.state();
        let until = state.until?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// When the pause ends, while one is in force.
    pub fn until(&self) -> Option<Timestamp> {
        let state = self.state();
        state.until.filter(|until| *until > Instant::now())?;
        state.until_wall
    }

    /// Pauses the tenant after a 429: for `retry_after` when the upstream
    /// said, else for the backoff; never longer than `cap`, never shorter
    /// than a pause already in force. Returns the wait from now.
    pub fn pause(
        &self,
        tenant: &TenantId,
        retry_after: Option<Duration>,
        cap: Duration,
    ) -> Duration {
        let mut state = self.state();
        state.strikes = state.strikes.saturating_add(1);
        let wait = match retry_after {
            Some(wait) => wait,
            None => {
                let ceiling = FIRST_PAUSE
                    .saturating_mul(2u32.saturating_pow(state.strikes - 1))
                    .min(cap);
                let half = ceiling / 2;
                half + Duration::from_millis(rand::rng().random_range(0..=half.as_millis() as u64))
            }
        }
        .min(cap);
        let until = Instant::now() + wait;
        if state.until.is_none_or(|current| current < until) {
            state.until = Some(until);
            state.until_wall = Some(Timestamp::from_millis(
                now().as_millis() + wait.as_millis() as i64,
            ));
            metrics::counter!("runpilot_tenant_throttle_pauses_total", "tenant" => tenant.to_string())
                .increment(1);
            metrics::gauge!("runpilot_tenant_throttled_until_seconds", "tenant" => tenant.to_string())
                .set(state.until_wall.map_or(0.0, |t| t.as_millis() as f64 / 1000.0));
            tracing::info!(
                tenant = %tenant, wait_ms = wait.as_millis() as u64,
                until = %state.until_wall.map(|t| t.to_rfc3339()).unwrap_or_default(),
                "tenant throttled by its upstream; its dispatch is paused"
            );
        }
        let until = state.until.unwrap_or(until);
        until.saturating_duration_since(Instant::now())
    }

    /// An item of the tenant succeeded: the next 429 starts the backoff anew.
    pub fn record_success(&self) {
        self.state().strikes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantId {
        TenantId::parse("t").unwrap()
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let throttle = Throttle::default();
        assert!(throttle.remaining().is_none());
        let wait = throttle.pause(
            &tenant(),
            Some(Duration::from_secs(600)),
            Duration::from_secs(300),
        );
        assert!(wait <= Duration::from_secs(300) && wait > Duration::from_secs(299));
        assert!(throttle.until().is_some());
        // A shorter pause does not shorten the one in force.
        let wait = throttle.pause(
            &tenant(),
            Some(Duration::from_secs(1)),
            Duration::from_secs(300),
        );
        assert!(wait > Duration::from_secs(299));
    }

    #[test]
    fn without_retry_after_the_pause_backs_off_with_jitter_until_a_success() {
        let throttle = Throttle::default();
        let cap = Duration::from_secs(3600);
        let first = throttle.pause(&tenant(), None, cap);
        assert!(
            first >= Duration::from_millis(499) && first <= Duration::from_secs(1),
            "{first:?}"
        );
        let fourth = Throttle::default();
        fourth.state().strikes = 3;
        let w = fourth.pause(&tenant(), None, cap);
        assert!(
            w >= Duration::from_millis(3999) && w <= Duration::from_secs(8),
            "{w:?}"
        );
        fourth.record_success();
        assert_eq!(fourth.state().strikes, 0);
    }
}
