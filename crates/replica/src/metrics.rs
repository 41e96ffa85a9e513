//! Replication's figures for `GET /metrics`: the ISR changes this
//! process's partition leaders made (Kafka's `IsrShrinksPerSec` and
//! `IsrExpandsPerSec`).

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// ISR changes of every partition this process leads.
#[derive(Default)]
pub struct ReplicaMetrics {
    shrinks: Counter,
    expands: Counter,
}

/// The process's figures (every node in it shares them).
pub fn replica_metrics() -> &'static ReplicaMetrics {
    static METRICS: OnceLock<ReplicaMetrics> = OnceLock::new();
    METRICS.get_or_init(ReplicaMetrics::default)
}

impl ReplicaMetrics {
    /// A leader's ISR change from `before` members to `after` took effect.
    pub(crate) fn isr_changed(&self, before: usize, after: usize) {
        if after < before {
            self.shrinks.inc();
        } else if after > before {
            self.expands.inc();
        }
    }

    /// ISR shrinks and expands so far.
    pub fn isr_changes(&self) -> (u64, u64) {
        (self.shrinks.get(), self.expands.get())
    }

    /// Adds replication's series to `registry` (under its prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "replica_isr_shrinks",
            "ISR shrinks this node's partition leaders made (a follower fell behind)",
            self.shrinks.clone(),
        );
        registry.register(
            "replica_isr_expands",
            "ISR expansions this node's partition leaders made (a follower caught up)",
            self.expands.clone(),
        );
    }
}
