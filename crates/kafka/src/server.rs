//! The accept loop: connection limit, per-connection tasks, the periodic
//! retention task and graceful shutdown.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sluice_group::GroupCoordinator;
use sluice_log::Store;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::cluster::{self, ClusterCtx, Replicas};
use crate::{connection, ServeError, ServerConfig};

/// How long shutdown waits for in-flight requests (long polls, joins) before
/// dropping the connections that still have some.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every connection shares.
pub(crate) struct Ctx {
    pub store: Arc<Store>,
    /// Single node: the one group coordinator (cluster mode: see `cluster`).
    pub groups: Option<Arc<GroupCoordinator>>,
    /// Cluster mode only.
    pub cluster: Option<Arc<ClusterCtx>>,
    pub config: ServerConfig,
    /// Host and port clients are told to connect to.
    pub host: String,
    pub port: i32,
    /// Topic id -> name, for requests that name topics by id (Fetch v13+,
    /// Metadata, DeleteTopics v6). Entries are checked against the store on
    /// use, so a stale one is never trusted.
    pub topic_ids: parking_lot::RwLock<std::collections::HashMap<[u8; 16], String>>,
}

impl Ctx {
    /// The group coordinator, or the error code group requests get (cluster
    /// mode: NOT_COORDINATOR unless this node leads `__consumer_offsets-0`).
    pub(crate) fn groups(&self) -> Result<Arc<GroupCoordinator>, i16> {
        match (&self.groups, &self.cluster) {
            (Some(g), _) => Ok(g.clone()),
            (None, Some(c)) => c.groups(),
            (None, None) => Err(sluice_vocab::ErrorCode::NotCoordinator.code()),
        }
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    local_addr: SocketAddr,
    config: ServerConfig,
    store: Arc<Store>,
    replicas: Option<Arc<dyn Replicas>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (groups, cluster) = match replicas {
        None => (
            Some(GroupCoordinator::open(store.clone(), config.group.clone())?),
            None,
        ),
        Some(replicas) => (None, Some(Arc::new(ClusterCtx::new(replicas)))),
    };
    let (host, port) = match &config.advertised {
        Some((host, port)) => (host.clone(), i32::from(*port)),
        None => (
            advertised_ip(local_addr.ip()).to_string(),
            i32::from(local_addr.port()),
        ),
    };
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        groups,
        cluster: cluster.clone(),
        host,
        port,
        config,
        topic_ids: parking_lot::RwLock::new(std::collections::HashMap::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let retention = tokio::spawn(retention_loop(
        store.clone(),
        ctx.config.retention_check_interval,
        stop_rx.clone(),
    ));
    let mut duties = Vec::new();
    if let Some(cluster) = &cluster {
        duties.push(tokio::spawn(high_watermark_checkpoints(
            store.clone(),
            HW_CHECKPOINT_INTERVAL,
            stop_rx.clone(),
        )));
        duties.push(tokio::spawn(cluster::follow_coordinator(
            cluster.clone(),
            store.clone(),
            ctx.config.group.clone(),
            stop_rx.clone(),
        )));
    }
    let permits = Arc::new(Semaphore::new(ctx.config.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let ctx = ctx.clone();
                        let stop = stop_rx.clone();
                        connections.spawn(async move {
                            connection::run(ctx, socket, peer, stop).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(%peer, max_connections = ctx.config.max_connections,
                            "connection limit reached; closing new connection");
                        drop(socket);
                    }
                },
                Err(err) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(err) = done {
                    tracing::error!(error = %err, "connection task failed");
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "shutdown grace period over; dropping connections with requests in flight"
        );
        connections.shutdown().await;
    }
    let _ = retention.await;
    for duty in duties {
        let _ = duty.await;
    }
    if let Err(err) = store.flush_all() {
        tracing::error!(error = %err, "flush on shutdown failed");
    }
    Ok(())
}

/// A wildcard bind address cannot be connected to; tell clients loopback.
fn advertised_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// How often replicated partitions write their high watermark down (Kafka's
/// replica.high.watermark.checkpoint.interval.ms).
const HW_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// Cluster mode: periodic high watermark checkpoints, so a restarted node
/// serves what it knew was committed without waiting for its peers.
async fn high_watermark_checkpoints(
    store: Arc<Store>,
    every: Duration,
    stop: watch::Receiver<bool>,
) {
    every_tick(every, stop, move || {
        match store.checkpoint_high_watermarks() {
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "high watermark checkpoint failed"),
        }
    })
    .await;
}

async fn retention_loop(store: Arc<Store>, every: Duration, stop: watch::Receiver<bool>) {
    every_tick(every, stop, move || match store.enforce_retention() {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(deleted, "retention deleted segments"),
        Err(err) => tracing::error!(error = %err, "retention enforcement failed"),
    })
    .await;
}

/// Runs `work` on the blocking pool (it touches the disk; keep it off the async
/// workers) every `every`, skipping the immediate first tick so start-up is not
/// slowed down, until `stop` changes.
async fn every_tick<F>(every: Duration, mut stop: watch::Receiver<bool>, work: F)
where
    F: Fn() + Clone + Send + 'static,
{
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(err) = tokio::task::spawn_blocking(work.clone()).await {
            tracing::error!(error = %err, "periodic storage task failed");
        }
    }
}
