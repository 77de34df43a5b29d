//! Prometheus metrics (`GET /metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    /// Snapshots in the registry (set at scrape time).
    pub snapshots: Gauge,
    /// Sandboxes the daemon tracks (set at scrape time).
    pub sandboxes: Gauge,
    /// Branches whose snapshot is being written.
    pub branches_in_flight: Gauge,
    /// Branches that may be written at once (`--branch-concurrency`).
    pub branch_concurrency_cap: Gauge,
    /// Network namespaces made ahead and ready for a spawn (set at scrape
    /// time; `serve --netns-pool`).
    pub netns_pool_ready: Gauge,
    /// Seconds a `POST /v1/sandboxes` took, whatever its `n`.
    pub spawn_seconds: Histogram,
    /// Seconds per child of a spawn request.
    pub spawn_child_seconds: Histogram,
    /// Seconds a branch request took until it answered.
    pub branch_seconds: Histogram,
    /// Seconds the source sandbox was paused for a branch.
    pub branch_pause_seconds: Histogram,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let snapshots = Gauge::default();
        let sandboxes = Gauge::default();
        let branches_in_flight = Gauge::default();
        let branch_concurrency_cap = Gauge::default();
        let netns_pool_ready = Gauge::default();
        let build_info = Family::<Vec<(String, String)>, Gauge>::default();
        // From 100 us to about 100 s, a factor of 2 apart.
        let buckets = || exponential_buckets(0.0001, 2.0, 21);
        let spawn_seconds = Histogram::new(buckets());
        let spawn_child_seconds = Histogram::new(buckets());
        let branch_seconds = Histogram::new(buckets());
        let branch_pause_seconds = Histogram::new(buckets());
        registry.register(
            "forkd_snapshots_total",
            "Snapshots in the registry",
            snapshots.clone(),
        );
        registry.register(
            "forkd_sandboxes_active",
            "Sandboxes the daemon tracks",
            sandboxes.clone(),
        );
        registry.register(
            "forkd_branches_in_flight",
            "Branches whose snapshot is being written",
            branches_in_flight.clone(),
        );
        registry.register(
            "forkd_branch_concurrency_cap",
            "Branches that may be written at once (--branch-concurrency)",
            branch_concurrency_cap.clone(),
        );
        registry.register(
            "forkd_netns_pool_ready",
            "Network namespaces made ahead and ready for a spawn",
            netns_pool_ready.clone(),
        );
        registry.register(
            "forkd_build_info",
            "The daemon's version",
            build_info.clone(),
        );
        build_info
            .get_or_create(&vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )])
            .set(1);
        registry.register(
            "forkd_spawn_duration_seconds",
            "Time to answer a spawn request",
            spawn_seconds.clone(),
        );
        registry.register(
            "forkd_spawn_child_duration_seconds",
            "Spawn request time divided by the children it started",
            spawn_child_seconds.clone(),
        );
        registry.register(
            "forkd_branch_duration_seconds",
            "Time to answer a branch request",
            branch_seconds.clone(),
        );
        registry.register(
            "forkd_branch_pause_seconds",
            "Time the source sandbox was paused for a branch",
            branch_pause_seconds.clone(),
        );
        Metrics {
            registry,
            snapshots,
            sandboxes,
            branches_in_flight,
            branch_concurrency_cap,
            netns_pool_ready,
            spawn_seconds,
            spawn_child_seconds,
            branch_seconds,
            branch_pause_seconds,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_metrics_are_exposed() {
        let m = Metrics::new();
        m.snapshots.set(3);
        m.spawn_seconds.observe(0.01);
        let text = m.render();
        for name in [
            "forkd_snapshots_total 3",
            "forkd_sandboxes_active 0",
            "forkd_branches_in_flight 0",
            "forkd_netns_pool_ready 0",
            "forkd_build_info{version=\"",
            "forkd_spawn_duration_seconds_bucket",
            "forkd_branch_pause_seconds_count",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
