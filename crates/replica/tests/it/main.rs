//! Integration tests of sluice-replica: three real ClusterNodes, Stores and
//! ReplicaManagers in one process (followers fetch through the in-process connector).

mod replication;
mod support;

#[test]
fn config_defaults_are_kafkas() {
    let c = sluice_replica::ReplicaConfig::new(1);
    assert_eq!(c.replica_lag_max, std::time::Duration::from_secs(5));
    assert_eq!(c.fetch_max_wait, std::time::Duration::from_millis(500));
    assert_eq!(c.default_min_insync, 2);
}
