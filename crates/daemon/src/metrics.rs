//! Prometheus metrics (`GET /metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

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
    /// Per sandbox (at most [`PER_SANDBOX_MAX`], the oldest first; set at
    /// scrape time): CPU seconds, private and shared memory, disk layer
    /// and network bytes.
    pub per_sandbox: PerSandbox,
    /// Live sandboxes left out of the per-sandbox metrics by the bound.
    pub per_sandbox_omitted: Gauge,
}

/// Most sandboxes the per-sandbox metrics name: the bound on their
/// cardinality (each sandbox is one series per metric).
pub const PER_SANDBOX_MAX: usize = 100;

/// A per-sandbox gauge: one series per `sandbox` label.
pub type SandboxGauge = Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>;

/// The per-sandbox gauges.
#[derive(Default)]
pub struct PerSandbox {
    /// `forkd_sandbox_cpu_seconds`.
    pub cpu_seconds: SandboxGauge,
    /// `forkd_sandbox_memory_private_bytes`.
    pub memory_private: SandboxGauge,
    /// `forkd_sandbox_memory_shared_bytes`.
    pub memory_shared: SandboxGauge,
    /// `forkd_sandbox_disk_layer_bytes`.
    pub disk_layer: SandboxGauge,
    /// `forkd_sandbox_net_rx_bytes`.
    pub net_rx: SandboxGauge,
    /// `forkd_sandbox_net_tx_bytes`.
    pub net_tx: SandboxGauge,
}

impl PerSandbox {
    fn all(&self) -> [&SandboxGauge; 6] {
        [
            &self.cpu_seconds,
            &self.memory_private,
            &self.memory_shared,
            &self.disk_layer,
            &self.net_rx,
            &self.net_tx,
        ]
    }

    /// Replaces every series with those of `samples`.
    pub fn set(&self, samples: &[proto::api::SandboxStats]) {
        for g in self.all() {
            g.clear();
        }
        for s in samples {
            let labels = vec![("sandbox".to_string(), s.id.clone())];
            let put = |g: &SandboxGauge, v: Option<f64>| {
                if let Some(v) = v {
                    g.get_or_create(&labels).set(v);
                }
            };
            put(&self.cpu_seconds, s.cpu_seconds);
            put(
                &self.memory_private,
                s.memory_private_bytes.map(|b| b as f64),
            );
            put(&self.memory_shared, s.memory_shared_bytes.map(|b| b as f64));
            put(&self.disk_layer, s.disk_layer_bytes.map(|b| b as f64));
            put(&self.net_rx, s.net_rx_bytes.map(|b| b as f64));
            put(&self.net_tx, s.net_tx_bytes.map(|b| b as f64));
        }
    }
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
        let per_sandbox = PerSandbox::default();
        for (name, help, g) in [
            (
                "forkd_sandbox_cpu_seconds",
                "CPU time a sandbox's VMM has used",
                &per_sandbox.cpu_seconds,
            ),
            (
                "forkd_sandbox_memory_private_bytes",
                "Resident memory only this sandbox maps",
                &per_sandbox.memory_private,
            ),
            (
                "forkd_sandbox_memory_shared_bytes",
                "Resident memory this sandbox shares with others of its snapshot",
                &per_sandbox.memory_shared,
            ),
            (
                "forkd_sandbox_disk_layer_bytes",
                "Bytes a sandbox's own disk layers hold",
                &per_sandbox.disk_layer,
            ),
            (
                "forkd_sandbox_net_rx_bytes",
                "Bytes a sandbox's guest received",
                &per_sandbox.net_rx,
            ),
            (
                "forkd_sandbox_net_tx_bytes",
                "Bytes a sandbox's guest sent",
                &per_sandbox.net_tx,
            ),
        ] {
            registry.register(name, help, g.clone());
        }
        let per_sandbox_omitted = Gauge::default();
        registry.register(
            "forkd_sandbox_metrics_omitted",
            "Live sandboxes the per-sandbox metrics leave out (they name at most 100)",
            per_sandbox_omitted.clone(),
        );
        Metrics {
            registry,
            per_sandbox,
            per_sandbox_omitted,
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
