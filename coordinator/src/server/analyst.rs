//! What the analysts see after each round: the round's alerts (logged at ERROR and stored in
//! its report) and `OUT/report.html`, re-rendered from the history. Neither may fail a round:
//! the model and its report are already safe on disk when the page is rendered, so a render
//! or write error is logged and the next round tries again.

use super::Coordinator;
use crate::alerts::Alert;
use crate::html::{History, Run};
use crate::report::RoundReport;
use crate::store::Store;

/// `OUT/report.html`.
pub const HTML_NAME: &str = "report.html";

impl Coordinator {
    /// The history, loaded from the reports already on disk the first time (a resumed run).
    /// A report that cannot be read is logged and the history starts empty: alerts then miss
    /// the earlier rounds, which is better than refusing to run.
    fn with_history<T>(&self, store: &Store, f: impl FnOnce(&mut History) -> T) -> Option<T> {
        let mut guard = self.history.lock().ok()?;
        let h = guard.get_or_insert_with(|| {
            let run = Run::load(&store.root).unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading earlier reports for alerts and report.html");
                Run {
                    dir: store.root.clone(),
                    reports: Vec::new(),
                    baseline: None,
                    bounds: (None, None),
                }
            });
            History::from_run(&run, self.cfg.alerts.clone())
        });
        Some(f(h))
    }

    /// The alerts this round raises, each logged at ERROR. Call before the round's report is
    /// written (so it is not yet in the history read from disk).
    pub(super) fn round_alerts(&self, store: &Store, report: &RoundReport) -> Vec<Alert> {
        let alerts = self
            .with_history(store, |h| h.observe(report))
            .unwrap_or_default();
        for a in &alerts {
            tracing::error!(
                round = a.round,
                alert = a.kind.tag(),
                "ALERT: {}",
                a.message
            );
        }
        alerts
    }

    /// Adds the round to the history and rewrites `OUT/report.html` (temp file + rename).
    pub(super) async fn refresh_html(&self, store: &Store, report: &RoundReport) {
        let t = std::time::Instant::now();
        let Some(html) = self.with_history(store, |h| {
            h.push(report);
            crate::html::render(h)
        }) else {
            tracing::error!(
                round = report.round,
                "report.html not refreshed: history lock poisoned"
            );
            return;
        };
        let path = store.root.join(HTML_NAME);
        let written = tokio::task::spawn_blocking({
            let path = path.clone();
            move || crate::html::write(&path, &html).map(|()| html.len())
        })
        .await;
        match written {
            Ok(Ok(len)) => tracing::debug!(
                round = report.round,
                bytes = len,
                ms = t.elapsed().as_millis() as u64,
                "{} refreshed",
                path.display()
            ),
            Ok(Err(e)) => {
                tracing::error!(round = report.round, error = %e, "report.html not refreshed")
            }
            Err(e) => tracing::error!(round = report.round, error = %e, "report.html task failed"),
        }
    }
}
