//! Integration tests of sluice-replica: three real ClusterNodes, Stores and
//! ReplicaManagers in one process (followers fetch through the in-process connector).

// A failed unwrap is a failed test (clippy.toml allows it in #[test] fns only).
#![allow(clippy::unwrap_used)]

mod replication;
mod support;

#[test]
fn config_defaults_are_kafkas() {
    let c = sluice_replica::ReplicaConfig::new(1);
    assert_eq!(c.replica_lag_max, std::time::Duration::from_secs(5));
    assert_eq!(c.fetch_max_wait, std::time::Duration::from_millis(500));
}
