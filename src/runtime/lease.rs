//! Run ownership across nodes. Each node has an id; a run is executed only
//! by the node holding its lease (owner and expiry in the store), which this
//! heartbeat renews every `cluster.heartbeat`. A node that cannot renew for
//! a whole `cluster.lease` stops executing its runs; any node takes over runs
//! whose lease expired. Every takeover raises the run's epoch, and every write
//! of a run's state is fenced by it, so a stalled node that wakes up cannot
//! overwrite its successor: its next write is refused and it drops the run.

use std::time::Instant;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{Directory, registry};
use crate::domain::now;
use crate::store::ClaimScope;

/// The host name and a random suffix: unique per process start.
pub(super) fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let suffix: u32 = rand::random();
    format!("{host}-{:06x}", suffix & 0xff_ffff)
}

/// Renews this node's leases, relays cancels stored through other nodes,
/// and takes over runs whose lease expired, until `stop`.
pub(super) async fn heartbeat(directory: Directory, stop: CancellationToken) {
    let cluster = directory.shared.config.cluster.clone();
    let mut ticker = tokio::time::interval(cluster.heartbeat.0);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_renewed = Instant::now();
    // Set after this node dropped its runs for want of the store: its own
    // leases are then taken back (with a new epoch), not merely renewed.
    let mut dropped_runs = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => break,
        }
        let store = &directory.shared.store;
        if dropped_runs {
            match directory.claim(ClaimScope::ExpiredOrOwn).await {
                Ok(n) => {
                    dropped_runs = false;
                    last_renewed = Instant::now();
                    tracing::info!(runs = n, "the store is back; runs taken back");
                }
                Err(e) => tracing::warn!(error = %e, "cannot take runs back yet"),
            }
            continue;
        }
        let at = now();
        match store
            .renew_leases(&directory.shared.node_id, directory.lease_end(at))
            .await
        {
            Ok(renewed) => {
                last_renewed = Instant::now();
                for run in renewed.into_iter().filter(|r| r.cancel_requested) {
                    directory
                        .registry(&run.tenant)
                        .do_send(registry::CancelStored { id: run.id });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew this node's leases");
                if last_renewed.elapsed() >= cluster.lease.0 {
                    tracing::warn!("leases lapsed: this node stops executing its runs");
                    directory.drop_all_runs();
                    dropped_runs = true;
                }
                continue;
            }
        }
        match directory.claim(ClaimScope::Expired).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "took over runs whose lease expired"),
            Err(e) => tracing::warn!(error = %e, "cannot look for expired leases"),
        }
    }
}
