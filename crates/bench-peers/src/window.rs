//! A window of publishes awaiting their broker acknowledgement. A separate
//! task awaits the acknowledgements in send order and timestamps each as it
//! resolves, so latency is taken when the ack arrives rather than when the
//! publisher next gets round to looking (which would inflate it to roughly
//! window / rate).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::stats::{nanos_since, LatencyRecorder};

type Pending<T> = (u64, T, OwnedSemaphorePermit);

pub struct Window<T> {
    sem: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Pending<T>>,
    task: JoinHandle<Result<LatencyRecorder>>,
}

impl<T: Send + 'static> Window<T> {
    /// `settle` awaits one acknowledgement and fails on a refusal.
    pub fn new<F, Fut>(size: usize, start: Instant, settle: F) -> Self
    where
        F: Fn(T) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send,
    {
        let sem = Arc::new(Semaphore::new(size.max(1)));
        let (tx, mut rx) = mpsc::unbounded_channel::<Pending<T>>();
        let closer = Arc::clone(&sem);
        let task = tokio::spawn(async move {
            let mut lat = LatencyRecorder::new();
            while let Some((due, ack, permit)) = rx.recv().await {
                if let Err(e) = settle(ack).await {
                    // Wake a publisher blocked on a permit: it must fail, not hang.
                    closer.close();
                    return Err(e);
                }
                lat.record_ns(nanos_since(start).saturating_sub(due));
                drop(permit);
            }
            Ok(lat)
        });
        Self { sem, tx, task }
    }

    /// Waits for room in the window.
    pub async fn reserve(&self) -> Result<OwnedSemaphorePermit> {
        Arc::clone(&self.sem)
            .acquire_owned()
            .await
            .context("acknowledgements failed (see the error below)")
    }

    /// Hands a sent message's acknowledgement future to the settling task.
    pub fn push(&self, due_ns: u64, ack: T, permit: OwnedSemaphorePermit) -> Result<()> {
        self.tx
            .send((due_ns, ack, permit))
            .ok()
            .context("acknowledgement task ended")
    }

    /// Waits for every acknowledgement; returns send→ack latencies.
    pub async fn finish(self) -> Result<LatencyRecorder> {
        drop(self.tx);
        self.task.await.context("acknowledgement task panicked")?
    }

    /// Publisher failed: surface the settling task's error if it has one
    /// (the root cause), else the publisher's.
    pub async fn fail(self, publisher_error: anyhow::Error) -> anyhow::Error {
        drop(self.tx);
        match self.task.await {
            Ok(Err(e)) => e,
            _ => publisher_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn latency_is_taken_when_the_ack_resolves() {
        let start = Instant::now();
        let w: Window<Duration> = Window::new(4, start, |d| async move {
            tokio::time::sleep(d).await;
            Ok(())
        });
        for _ in 0..3 {
            let p = w.reserve().await.expect("permit");
            w.push(nanos_since(start), Duration::from_millis(20), p)
                .expect("push");
        }
        let lat = w.finish().await.expect("finish");
        let s = lat.summary().expect("samples");
        assert_eq!(lat.len(), 3);
        // Sequential settling: 20, 40, 60 ms.
        assert!(s.max >= 59.0 && s.max < 200.0, "max {}", s.max);
        assert!(s.p50 >= 19.0, "p50 {}", s.p50);
    }

    #[tokio::test]
    async fn window_bounds_outstanding_and_errors_unblock_the_publisher() {
        let start = Instant::now();
        let w: Window<bool> = Window::new(1, start, |ok| async move {
            if ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!("nack"))
            }
        });
        let p = w.reserve().await.expect("permit");
        w.push(0, false, p).expect("push");
        // The only permit is held by the failed ack: reserve must fail, not hang.
        let r = tokio::time::timeout(Duration::from_secs(5), w.reserve())
            .await
            .expect("no hang");
        assert!(r.is_err());
        let e = w.fail(anyhow::anyhow!("publisher")).await;
        assert_eq!(e.to_string(), "nack");
    }
}
