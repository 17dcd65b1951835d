//! The coordinator's side of `OUT/status.json`: the task that rewrites it every
//! `[metrics] status_interval_ms`. The file's format and its reader live in
//! [`coevo_ops::status`] (re-exported here), so `coevo status` reads it without libtorch.

pub use coevo_ops::status::*;
use std::path::PathBuf;

/// The task rewriting `status.json` while the coordinator runs; dropped (e.g. with a
/// cancelled coordinator future), it stops, so a dead coordinator's file goes stale.
pub(crate) struct StatusWriter {
    task: Option<tokio::task::JoinHandle<()>>,
    metrics: std::sync::Arc<crate::metrics::CoordinatorMetrics>,
    out: PathBuf,
}

/// Starts rewriting `out/status.json` from `metrics` every `interval_ms` (`None` when 0).
pub(crate) fn spawn_writer(
    metrics: std::sync::Arc<crate::metrics::CoordinatorMetrics>,
    out: PathBuf,
    interval_ms: u64,
) -> Option<StatusWriter> {
    if interval_ms == 0 {
        return None;
    }
    let task = {
        let (metrics, out) = (metrics.clone(), out.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tick.tick().await;
                match write_status(&out, &metrics.snapshot()) {
                    Ok(()) => failing = false,
                    // Once per spell of failures: a full disk must not flood the log.
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(path = %status_path(&out).display(), error = %e, "cannot write the live status file");
                    }
                    Err(_) => {}
                }
            }
        })
    };
    Some(StatusWriter {
        task: Some(task),
        metrics,
        out,
    })
}

impl StatusWriter {
    /// Stops the periodic writes and writes the final state (finished, stopped or failed).
    pub(crate) async fn finish(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Waits until an interrupted write is over, so the final write is the last.
            let _ = task.await;
        }
        if let Err(e) = write_status(&self.out, &self.metrics.snapshot()) {
            tracing::warn!(error = %e, "cannot write the final live status file");
        }
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
