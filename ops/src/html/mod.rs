//! The HTML round report (`coevo report DIR --html FILE`, and `OUT/report.html`, refreshed by
//! the coordinator after every round): one self-contained file an analyst can open offline,
//! mail, or archive with the run.
//!
//! - **Offline and inert**: server-side SVG, inline CSS, no script, and a
//!   `Content-Security-Policy` that forbids every load (`default-src 'none'`), so opening a
//!   report never touches the network, whatever a client id or reason in it says (every string
//!   from a report is HTML-escaped as well).
//! - **Bounded**: built from a [`History`] that keeps every round's summary but only the latest
//!   round's per-client rows and one running total per client, so a 10,000-client fleet's
//!   report stays a few hundred KB and the coordinator's memory does not grow with rounds ×
//!   clients. Client tables show the top and bottom rows with totals; the full list is the CSV.
//! - **Responsive**: charts are SVG with a `viewBox` at 100 % width, cards flow in a CSS grid,
//!   wide tables scroll sideways, so a 390-px phone and a desktop window both read it.

pub mod svg;

use crate::alerts::{Alert, AlertConfig, AlertState};
use crate::export::{client_rows, ClientRow, Status};
use crate::report::RoundReport;
use crate::OpsError;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Rows of the latest round's client table shown before it is cut (the rest in the CSV).
const LATEST_TOP: usize = 30;
const LATEST_BOTTOM: usize = 10;
/// Rows of the all-rounds client table.
const CLIENTS_TOP: usize = 50;
/// Rounds listed in the per-round tables (the latest ones); charts show every round.
const TABLE_ROUNDS: usize = 200;
/// Heatmap columns: beyond this many rounds, columns average consecutive rounds.
const HEATMAP_COLUMNS: usize = 120;
/// Alerts listed at the top (newest first).
const ALERTS_SHOWN: usize = 100;
/// Rejection entries kept per round in the history (counts by reason are kept in full).
const KEEP_REJECTED: usize = 20;

/// HTML-escapes text for element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A coordinator output directory, or a `coevo bench coevolution` directory (its `coevolve/`
/// run, with the `fedavg/` student as baseline and the bounds from `summary.json`).
#[derive(Debug)]
pub struct Run {
    pub dir: PathBuf,
    /// The run the report is about.
    pub reports: Vec<RoundReport>,
    /// `fedavg` when the directory is a bench with both modes.
    pub baseline: Option<(String, Vec<RoundReport>)>,
    /// The bench's teacher lower and upper bounds (test accuracy).
    pub bounds: (Option<f64>, Option<f64>),
}

impl Run {
    /// Loads the reports of `dir` (a coordinator `out/`, its `reports/`, or a bench directory).
    pub fn load(dir: &Path) -> Result<Run, OpsError> {
        let has = |mode: &str| dir.join(mode).join("reports").is_dir();
        if has("coevolve") || has("fedavg") {
            let load = |mode: &str| -> Result<Vec<RoundReport>, OpsError> {
                if has(mode) {
                    crate::report::load_reports(&dir.join(mode))
                } else {
                    Ok(Vec::new())
                }
            };
            let (coevolve, fedavg) = (load("coevolve")?, load("fedavg")?);
            let bounds = std::fs::read(dir.join("summary.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .map(|v| (v["lower_bound"].as_f64(), v["upper_bound"].as_f64()))
                .unwrap_or((None, None));
            let (reports, baseline) = if coevolve.is_empty() {
                (fedavg, None)
            } else if fedavg.is_empty() {
                (coevolve, None)
            } else {
                (coevolve, Some(("fedavg student".to_string(), fedavg)))
            };
            return Ok(Run {
                dir: dir.to_path_buf(),
                reports,
                baseline,
                bounds,
            });
        }
        Ok(Run {
            dir: dir.to_path_buf(),
            reports: crate::report::load_reports(dir)?,
            baseline: None,
            bounds: (None, None),
        })
    }
}

/// One client across every round seen.
#[derive(Clone, Debug, Default)]
struct ClientTotals {
    /// Rounds per status (accepted, clipped, excluded, rejected, late, lost).
    by_status: BTreeMap<Status, u64>,
    rejected_messages: u64,
    flagged: u64,
    samples: u64,
    bytes_up: u64,
    bytes_down: u64,
    last_round: u64,
    last_status: Option<Status>,
    last_reason: String,
    last_loss: Option<f64>,
    last_norm: Option<f64>,
}

impl ClientTotals {
    fn trouble(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(s, _)| s.is_trouble())
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.flagged
    }
}

/// What one round contributes to the report, without its per-client detail.
#[derive(Clone, Debug)]
struct RoundSummary {
    /// The report with `clients` emptied and `rejected`/`late` cut to [`KEEP_REJECTED`].
    report: RoundReport,
    /// Rejected messages per stable reason code.
    rejected_codes: BTreeMap<String, u64>,
    rejected_clients: usize,
    /// Exclusions per reason.
    excluded_codes: BTreeMap<String, u64>,
    late_messages: u64,
}

/// The stable code of a reason: the text before the first `:`.
fn code(reason: &str) -> &str {
    reason.split(':').next().unwrap_or(reason).trim()
}

/// (round, test accuracy) of a baseline run.
type RoundAccuracy = (u64, Option<f64>);
/// One class's values, one per heatmap column.
type HeatRow = Vec<Option<f64>>;

/// Everything the HTML report is made from, kept small (see the module doc).
pub struct History {
    pub title: String,
    rounds: Vec<RoundSummary>,
    latest_rows: Vec<ClientRow>,
    clients: HashMap<String, ClientTotals>,
    alert_state: AlertState,
    alerts: Vec<Alert>,
    /// A label and its student accuracy per round (the bench's FedAvg run).
    baseline: Option<(String, Vec<RoundAccuracy>)>,
    bounds: (Option<f64>, Option<f64>),
}

impl History {
    pub fn new(title: impl Into<String>, cfg: AlertConfig) -> Self {
        History {
            title: title.into(),
            rounds: Vec::new(),
            latest_rows: Vec::new(),
            clients: HashMap::new(),
            alert_state: AlertState::new(cfg),
            alerts: Vec::new(),
            baseline: None,
            bounds: (None, None),
        }
    }

    /// The history of a loaded run, alerts recomputed with `cfg`.
    pub fn from_run(run: &Run, cfg: AlertConfig) -> Self {
        let mut h = History::new(run.dir.display().to_string(), cfg);
        let mut sorted: Vec<&RoundReport> = run.reports.iter().collect();
        sorted.sort_by_key(|r| r.round);
        for r in sorted {
            h.observe(r);
            h.push(r);
        }
        h.baseline = run.baseline.as_ref().map(|(label, reports)| {
            (
                label.clone(),
                reports
                    .iter()
                    .map(|r| (r.round, r.student.test_accuracy))
                    .collect(),
            )
        });
        h.bounds = run.bounds;
        h
    }

    /// Alerts of `r` (the next round), remembered for the report; call before [`Self::push`].
    pub fn observe(&mut self, r: &RoundReport) -> Vec<Alert> {
        let new = self.alert_state.observe(r);
        self.alerts.extend(new.iter().cloned());
        new
    }

    /// Every alert observed so far.
    pub fn alerts(&self) -> &[Alert] {
        &self.alerts
    }

    /// Number of rounds held.
    pub fn rounds(&self) -> usize {
        self.rounds.len()
    }

    /// Adds a round: its summary, its client rows (which replace the previous round's) and
    /// the per-client totals.
    pub fn push(&mut self, r: &RoundReport) {
        let rows = client_rows(r);
        let mut flagged_now = std::collections::HashSet::new();
        for f in &r.flagged {
            flagged_now.insert(f.client.as_str());
        }
        for row in &rows {
            let t = self.clients.entry(row.client.clone()).or_default();
            *t.by_status.entry(row.status).or_default() += 1;
            if row.status == Status::Rejected {
                t.rejected_messages += row.messages.unwrap_or(0);
            }
            if flagged_now.contains(row.client.as_str()) && row.samples.is_some() {
                t.flagged += 1;
            }
            t.samples += row.samples.unwrap_or(0);
            t.bytes_up += row.bytes_up.unwrap_or(0);
            t.bytes_down += row.bytes_down.unwrap_or(0);
            // An accepted row outranks a rejected one of the same round as "last status".
            if t.last_round != r.round || row.samples.is_some() {
                t.last_round = r.round;
                t.last_status = Some(row.status);
                t.last_reason = row.reason.clone();
                if row.samples.is_some() {
                    t.last_loss = row.local_loss;
                    t.last_norm = row.delta_norm;
                }
            }
        }
        let mut rejected_codes = BTreeMap::new();
        for x in &r.rejected {
            *rejected_codes
                .entry(code(&x.reason).to_string())
                .or_insert(0) += x.count;
        }
        let mut excluded_codes = BTreeMap::new();
        for x in &r.excluded {
            *excluded_codes
                .entry(code(&x.reason).to_string())
                .or_insert(0) += 1;
        }
        let rejected_clients = r
            .rejected
            .iter()
            .map(|x| x.client.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len();
        let mut slim = r.clone();
        slim.clients = Vec::new();
        slim.rejected.truncate(KEEP_REJECTED);
        slim.late.truncate(KEEP_REJECTED);
        slim.excluded.truncate(KEEP_REJECTED);
        slim.clipped.truncate(KEEP_REJECTED);
        slim.flagged.truncate(KEEP_REJECTED);
        slim.lost.truncate(KEEP_REJECTED);
        let summary = RoundSummary {
            report: slim,
            rejected_codes,
            rejected_clients,
            excluded_codes,
            late_messages: r.late.iter().map(|x| x.count).sum(),
        };
        // A re-run round (resume) replaces its earlier summary.
        match self.rounds.iter().position(|s| s.report.round == r.round) {
            Some(i) => self.rounds[i] = summary,
            None => {
                self.rounds.push(summary);
                self.rounds.sort_by_key(|s| s.report.round);
            }
        }
        if self
            .rounds
            .last()
            .is_some_and(|s| s.report.round == r.round)
        {
            self.latest_rows = rows;
        }
    }
}

/// Writes `html` to `path` atomically (temp file, fsync, rename): a browser refreshing the
/// report never sees half a file.
pub fn write(path: &Path, html: &str) -> Result<(), OpsError> {
    crate::write_atomic(path, html.as_bytes())
}

fn acc(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "–".to_string(), |x| format!("{x:.4}"))
}

/// Bytes as B / KiB / MiB / GiB.
pub fn bytes(b: f64) -> String {
    const K: f64 = 1024.0;
    if b >= K * K * K {
        format!("{:.2} GiB", b / (K * K * K))
    } else if b >= K * K {
        format!("{:.1} MiB", b / (K * K))
    } else if b >= 10.0 * K {
        format!("{:.1} KiB", b / K)
    } else {
        format!("{b:.0} B")
    }
}

fn ms(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0} s", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1} s", v / 1000.0)
    } else {
        format!("{v:.0} ms")
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(String::new, |x| format!("{x:.digits$}"))
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(String::new, |x| x.to_string())
}

const CSS: &str = r#"
:root{--fg:#1d2330;--muted:#5b6475;--bg:#f6f7f9;--card:#fff;--line:#dde1e8;--bad:#b42318;--warn:#b54708;--ok:#067647;
--student:#1f6fb4;--teacher:#c8372d;--fedavg:#6b7280;--lower:#9a6b00;--upper:#2e7d32;--down:#7c5cbf;--up:#1f9e89;
--publish:#4e79a7;--collect:#f28e2b;--aggregate:#59a14f;--evaluate:#e15759;--other:#bab0ac}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:12px}
h1{font-size:1.35rem;margin:.3rem 0}
h2{font-size:1.1rem;margin:0 0 .5rem}
p.sub{color:var(--muted);margin:.2rem 0 .8rem;overflow-wrap:anywhere}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px;margin:0 0 12px;min-width:0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,460px),1fr));gap:12px;margin:0 0 12px}
.grid>section{margin:0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:8px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px}
.card b{display:block;font-size:1.25rem}
.card span{color:var(--muted);font-size:.85rem}
#alerts.none{border-color:#abefc6;background:#f6fef9}
#alerts.some{border-color:#fda29b;background:#fffbfa}
#alerts ul{margin:0;padding-left:1.1rem}
#alerts li{margin:.2rem 0;overflow-wrap:anywhere}
.tag{display:inline-block;font-size:.75rem;font-weight:600;padding:0 .4em;border-radius:4px;background:#fee4e2;color:var(--bad);margin-right:.3em}
.legend{display:flex;flex-wrap:wrap;gap:.3rem 1rem;font-size:.85rem;margin:.2rem 0 .4rem}
.legend i{display:inline-block;width:1.6em;height:.6em;border-radius:2px;margin-right:.35em;vertical-align:middle}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
.heat{min-width:min(100%,520px)}
table{border-collapse:collapse;font-size:.85rem;width:100%}
th,td{padding:.25rem .45rem;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.why{white-space:normal;min-width:14rem;max-width:34rem;overflow-wrap:anywhere}
tr.total td{font-weight:600;border-top:2px solid var(--line)}
tr.gap td{color:var(--muted);text-align:center;font-style:italic}
.s-accepted{color:var(--ok)}.s-clipped{color:var(--warn)}.s-excluded,.s-rejected,.s-lost{color:var(--bad);font-weight:600}.s-late{color:var(--muted)}
.o-rolled_back,.o-skipped{color:var(--bad);font-weight:600}
.note{color:var(--muted);font-size:.85rem;margin:.4rem 0 0}
svg.chart{display:block;width:100%;height:auto}
svg .grid{stroke:#eceef2;stroke-width:1}
svg .axis{stroke:#8a93a3;stroke-width:1}
svg text{fill:#4a5263;font-size:17px}
svg .axis-label{font-size:17px;fill:#5b6475}
svg .series{fill:none;stroke-width:2.5;stroke-linejoin:round}
svg .dashed{stroke-dasharray:7 5;stroke-width:2}
svg .marker{stroke-width:2;stroke-dasharray:3 3}
svg .m-rolled_back{stroke:var(--bad)} svg .m-skipped{stroke:#98a2b3}
svg .cell.missing{fill:#f2f4f7}
.c-student{stroke:var(--student);fill:var(--student);background:var(--student)}
.c-teacher{stroke:var(--teacher);fill:var(--teacher);background:var(--teacher)}
.c-fedavg{stroke:var(--fedavg);fill:var(--fedavg);background:var(--fedavg)}
.c-lower{stroke:var(--lower);fill:var(--lower);background:var(--lower)}
.c-upper{stroke:var(--upper);fill:var(--upper);background:var(--upper)}
.c-down{fill:var(--down);background:var(--down)} .c-up{fill:var(--up);background:var(--up)}
.c-publish{fill:var(--publish);background:var(--publish)} .c-collect{fill:var(--collect);background:var(--collect)}
.c-aggregate{fill:var(--aggregate);background:var(--aggregate)} .c-evaluate{fill:var(--evaluate);background:var(--evaluate)}
.c-other{fill:var(--other);background:var(--other)}
svg polyline.series{fill:none}
.ramp{height:.7em;border-radius:2px;background:linear-gradient(90deg,#440154,#3b528b,#21918c,#5ec962,#fde725);max-width:240px;margin:.2rem 0}
@media (max-width:480px){main{padding:6px}section{padding:9px}h1{font-size:1.15rem}body{font-size:14px}}
"#;

fn legend(items: &[(&str, &str, bool)]) -> String {
    let mut s = String::from(r#"<div class="legend">"#);
    for (name, class, dashed) in items {
        let style = if *dashed {
            r#" style="background:repeating-linear-gradient(90deg,currentColor 0 6px,transparent 6px 10px)""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<span><i class="{class}"{style}></i>{}</span>"#,
            esc(name)
        );
    }
    s.push_str("</div>");
    s
}

/// Renders the report.
pub fn render(h: &History) -> String {
    let mut s = String::with_capacity(64 * 1024);
    let last = h.rounds.last().map(|r| &r.report);
    let fleet = last.map_or("", |r| r.fleet.as_str());
    let _ = write!(
        s,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="coevo">
<title>coevo report — {}</title><style>{CSS}</style></head><body><main>"#,
        esc(fleet)
    );
    let _ = write!(s, "<h1>coevo round report — fleet {}</h1>", esc(fleet));
    match last {
        None => {
            let _ = write!(
                s,
                r#"<p class="sub">{}: no rounds yet.</p></main></body></html>"#,
                esc(&h.title)
            );
            return s;
        }
        Some(r) => {
            let _ = write!(
                s,
                r#"<p class="sub">{} · mode <b>{}</b> · aggregation <b>{}</b> · codecs down/up <b>{}/{}</b> · {} rounds (last: {}) · {} registered clients</p>"#,
                esc(&h.title),
                esc(&r.mode),
                esc(&r.strategy),
                esc(&r.downlink_codec),
                esc(&r.uplink_codec),
                h.rounds.len(),
                r.round,
                r.registered
            );
        }
    }
    alerts_section(&mut s, h);
    figures_section(&mut s, h);
    s.push_str(r#"<div class="grid">"#);
    accuracy_section(&mut s, h);
    heatmap_section(&mut s, h);
    s.push_str("</div>");
    s.push_str(r#"<div class="grid">"#);
    bytes_section(&mut s, h);
    phases_section(&mut s, h);
    s.push_str("</div>");
    rounds_section(&mut s, h);
    coevolution_section(&mut s, h);
    latest_clients_section(&mut s, h);
    all_clients_section(&mut s, h);
    let _ = write!(
        s,
        r#"<p class="note">Generated by coevo from the round reports in {}. Every client of every round: <code>coevo report DIR --csv FILE</code>. The JSON reports are the source; this page only reads them.</p></main></body></html>"#,
        esc(&h.title)
    );
    s
}

fn alerts_section(s: &mut String, h: &History) {
    if h.alerts.is_empty() {
        s.push_str(r#"<section id="alerts" class="none"><h2>Alerts</h2><p>No alerts: no rollback, collapse, skipped round, repeatedly rejected client or teacher below its student.</p></section>"#);
        return;
    }
    let _ = write!(
        s,
        r#"<section id="alerts" class="some"><h2>Alerts ({})</h2><ul>"#,
        h.alerts.len()
    );
    for a in h.alerts.iter().rev().take(ALERTS_SHOWN) {
        let _ = write!(
            s,
            r#"<li class="alert" data-kind="{0}"><span class="tag">{0}</span>round {1}: {2}</li>"#,
            a.kind.tag(),
            a.round,
            esc(&a.message)
        );
    }
    s.push_str("</ul>");
    if h.alerts.len() > ALERTS_SHOWN {
        let _ = write!(
            s,
            r#"<p class="note">{} older alerts not shown (every report's <code>alerts</code> field has them).</p>"#,
            h.alerts.len() - ALERTS_SHOWN
        );
    }
    s.push_str("</section>");
}

fn best(h: &History, f: impl Fn(&RoundReport) -> Option<f64>) -> Option<(f64, u64)> {
    h.rounds
        .iter()
        .filter_map(|r| {
            f(&r.report)
                .filter(|v| v.is_finite())
                .map(|v| (v, r.report.round))
        })
        .fold(None, |b: Option<(f64, u64)>, (v, n)| match b {
            Some((bv, _)) if bv >= v => b,
            _ => Some((v, n)),
        })
}

fn figures_section(s: &mut String, h: &History) {
    let Some(last) = h.rounds.last().map(|r| &r.report) else {
        return;
    };
    let count = |p: &dyn Fn(&str) -> bool| h.rounds.iter().filter(|r| p(&r.report.outcome)).count();
    let completed = count(&|o| o == "completed");
    let rolled = count(&|o| o == "rolled_back");
    let skipped = count(&|o| o.starts_with("skipped"));
    let down: u64 = h.rounds.iter().map(|r| r.report.bytes_down).sum();
    let up: u64 = h.rounds.iter().map(|r| r.report.bytes_up).sum();
    s.push_str(r#"<section id="figures"><h2>Latest round</h2><div class="cards">"#);
    let mut card = |v: String, label: String| {
        let _ = write!(
            s,
            r#"<div class="card"><b>{}</b><span>{}</span></div>"#,
            esc(&v),
            esc(&label)
        );
    };
    card(
        acc(last.student.test_accuracy),
        format!("student test accuracy, round {}", last.round),
    );
    if let Some((b, n)) = best(h, |r| r.student.test_accuracy) {
        card(format!("{b:.4}"), format!("best student, round {n}"));
    }
    if last.teacher.test_accuracy.is_some() {
        card(
            acc(last.teacher.test_accuracy),
            "teacher test accuracy".into(),
        );
    }
    card(
        format!("{}/{}", last.accepted, last.registered),
        format!("accepted / registered (quorum {})", last.quorum),
    );
    card(
        format!("{completed}/{rolled}/{skipped}"),
        "rounds completed / rolled back / skipped".into(),
    );
    card(bytes(down as f64), "sent to clients, all rounds".into());
    card(bytes(up as f64), "received from clients, all rounds".into());
    card(ms(last.duration_ms as f64), "last round's wall time".into());
    s.push_str("</div></section>");
}

fn accuracy_section(s: &mut String, h: &History) {
    let pts = |f: &dyn Fn(&RoundReport) -> Option<f64>| -> Vec<(f64, Option<f64>)> {
        h.rounds
            .iter()
            .map(|r| (r.report.round as f64, f(&r.report)))
            .collect()
    };
    let mut series = vec![svg::Series {
        name: "student".into(),
        class: "c-student",
        points: pts(&|r| r.student.test_accuracy),
        dashed: false,
    }];
    let mut items = vec![("student (test)", "c-student", false)];
    if h.rounds
        .iter()
        .any(|r| r.report.teacher.test_accuracy.is_some())
    {
        series.push(svg::Series {
            name: "teacher".into(),
            class: "c-teacher",
            points: pts(&|r| r.teacher.test_accuracy),
            dashed: false,
        });
        items.push(("teacher (test)", "c-teacher", false));
    }
    if let Some((label, points)) = &h.baseline {
        series.push(svg::Series {
            name: "fedavg".into(),
            class: "c-fedavg",
            points: points.iter().map(|&(n, a)| (n as f64, a)).collect(),
            dashed: true,
        });
        items.push((label.as_str(), "c-fedavg", true));
    }
    let rounds: Vec<f64> = h.rounds.iter().map(|r| r.report.round as f64).collect();
    for (bound, name, class, label) in [
        (
            h.bounds.0,
            "lower",
            "c-lower",
            "teacher lower bound (labelled set only)",
        ),
        (
            h.bounds.1,
            "upper",
            "c-upper",
            "teacher upper bound (all data, central)",
        ),
    ] {
        if let Some(b) = bound {
            series.push(svg::Series {
                name: name.into(),
                class,
                points: rounds.iter().map(|&x| (x, Some(b))).collect(),
                dashed: true,
            });
            items.push((label, class, true));
        }
    }
    let markers: Vec<svg::Marker> = h
        .rounds
        .iter()
        .filter_map(|r| {
            let o = r.report.outcome.as_str();
            let class = if o == "rolled_back" {
                "m-rolled_back"
            } else if o.starts_with("skipped") {
                "m-skipped"
            } else {
                return None;
            };
            Some(svg::Marker {
                x: r.report.round as f64,
                class,
                title: format!("round {}: {o}", r.report.round),
            })
        })
        .collect();
    s.push_str(r#"<section id="accuracy"><h2>Test accuracy per round</h2>"#);
    s.push_str(&legend(&items));
    // Zoomed to the data (to tenths), so a one-point change is visible; a collapse still
    // shows down to where it fell.
    let (lo, hi) = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let range = if lo.is_finite() {
        (
            ((lo - 0.05) * 10.0).floor().max(0.0) / 10.0,
            ((hi + 0.02) * 10.0).ceil().min(10.0) / 10.0,
        )
    } else {
        (0.0, 1.0)
    };
    s.push_str(&svg::line_chart(
        "chart-accuracy",
        "test accuracy per round",
        &series,
        Some(range),
        &markers,
        &|v| format!("{v:.2}"),
    ));
    if !markers.is_empty() {
        s.push_str(r#"<p class="note">Vertical lines: rounds rolled back (red) or skipped (grey); the model stayed as it was.</p>"#);
    }
    s.push_str("</section>");
}

/// Per-class accuracy columns: one per round, or averages of consecutive rounds past
/// [`HEATMAP_COLUMNS`].
fn heat_columns(
    h: &History,
    f: &dyn Fn(&RoundReport) -> &[f64],
) -> Option<(Vec<String>, Vec<HeatRow>)> {
    let classes = h
        .rounds
        .iter()
        .map(|r| f(&r.report).len())
        .max()
        .unwrap_or(0);
    if classes == 0 {
        return None;
    }
    let n = h.rounds.len();
    let per = n.div_ceil(HEATMAP_COLUMNS).max(1);
    let mut cols = Vec::new();
    let mut rows = vec![Vec::new(); classes];
    for chunk in h.rounds.chunks(per) {
        let (a, b) = (chunk[0].report.round, chunk[chunk.len() - 1].report.round);
        cols.push(if a == b {
            a.to_string()
        } else {
            format!("{a}–{b}")
        });
        for (c, row) in rows.iter_mut().enumerate() {
            let vals: Vec<f64> = chunk
                .iter()
                .filter_map(|r| f(&r.report).get(c).copied())
                .filter(|v| v.is_finite())
                .collect();
            row.push(if vals.is_empty() {
                None
            } else {
                Some(vals.iter().sum::<f64>() / vals.len() as f64)
            });
        }
    }
    Some((cols, rows))
}

fn heatmap_section(s: &mut String, h: &History) {
    let student = heat_columns(h, &|r| &r.student.per_class_accuracy);
    let teacher = heat_columns(h, &|r| &r.teacher.per_class_accuracy);
    if student.is_none() && teacher.is_none() {
        return;
    }
    s.push_str(r#"<section id="per-class"><h2>Per-class test accuracy over rounds</h2><p class="note">Rows are classes, columns rounds; colour from 0 (dark) to 1 (yellow). Hover a cell for its value.</p><div class="ramp"></div>"#);
    let avg = h.rounds.len() > HEATMAP_COLUMNS;
    for (name, data) in [("student", student), ("teacher", teacher)] {
        let Some((cols, rows)) = data else { continue };
        let _ = write!(
            s,
            r#"<h2>{name}{}</h2><div class="scroll"><div class="heat">"#,
            if avg {
                " (columns average consecutive rounds)"
            } else {
                ""
            }
        );
        s.push_str(&svg::heatmap(
            &format!("heatmap-{name}"),
            &format!("{name} per-class accuracy"),
            &cols,
            &rows,
        ));
        s.push_str("</div></div>");
    }
    s.push_str("</section>");
}

fn bytes_section(s: &mut String, h: &History) {
    let cats: Vec<u64> = h.rounds.iter().map(|r| r.report.round).collect();
    // Chart in one binary unit picked by the largest value, so the axis ticks are round
    // numbers of it (100 KiB, not 97.7 KiB).
    let max = h
        .rounds
        .iter()
        .map(|r| r.report.bytes_down.max(r.report.bytes_up))
        .max()
        .unwrap_or(0) as f64;
    let (div, unit) = [
        (1024f64.powi(3), "GiB"),
        (1024f64.powi(2), "MiB"),
        (1024.0, "KiB"),
    ]
    .into_iter()
    .find(|(d, _)| max >= 2.0 * d)
    .unwrap_or((1.0, "B"));
    let bars = [
        svg::Bars {
            name: "down (models)".into(),
            class: "c-down",
            values: h
                .rounds
                .iter()
                .map(|r| r.report.bytes_down as f64 / div)
                .collect(),
        },
        svg::Bars {
            name: "up (deltas)".into(),
            class: "c-up",
            values: h
                .rounds
                .iter()
                .map(|r| r.report.bytes_up as f64 / div)
                .collect(),
        },
    ];
    s.push_str(r#"<section id="bytes"><h2>Bytes per round</h2>"#);
    s.push_str(&legend(&[
        ("down: model × registered clients", "c-down", false),
        ("up: accepted deltas", "c-up", false),
    ]));
    s.push_str(&svg::bar_chart(
        "chart-bytes",
        "bytes per round",
        &cats,
        &bars,
        false,
        &|v| {
            let digits = if v != v.round() { 1 } else { 0 };
            format!("{v:.digits$} {unit}")
        },
    ));
    if let Some(r) = h.rounds.last() {
        let n = r.report.accepted.max(1) as f64;
        let _ = write!(
            s,
            r#"<p class="note">Per client in round {}: {} down, {} up on average (payload bytes; MQTT framing not counted). Per-client totals are in the client tables below.</p>"#,
            r.report.round,
            bytes(r.report.bytes_down as f64 / r.report.registered.max(1) as f64),
            bytes(r.report.bytes_up as f64 / n)
        );
    }
    s.push_str("</section>");
}

fn phases_section(s: &mut String, h: &History) {
    let cats: Vec<u64> = h.rounds.iter().map(|r| r.report.round).collect();
    type Phase = fn(&RoundReport) -> u64;
    let phases: [(&str, &'static str, Phase); 4] = [
        ("publish", "c-publish", |r| r.phase_ms.publish),
        ("collect", "c-collect", |r| r.phase_ms.collect),
        ("aggregate", "c-aggregate", |r| r.phase_ms.aggregate),
        ("evaluate", "c-evaluate", |r| r.phase_ms.evaluate),
    ];
    let mut bars: Vec<svg::Bars> = phases
        .iter()
        .map(|(name, class, f)| svg::Bars {
            name: (*name).into(),
            class,
            values: h.rounds.iter().map(|r| f(&r.report) as f64).collect(),
        })
        .collect();
    // The rest of the wall time: distillation and fusion in coevolve mode, bookkeeping.
    bars.push(svg::Bars {
        name: "other".into(),
        class: "c-other",
        values: h
            .rounds
            .iter()
            .map(|r| {
                let p = &r.report.phase_ms;
                let sum = p.publish + p.collect + p.aggregate + p.evaluate;
                r.report.duration_ms.saturating_sub(sum) as f64
            })
            .collect(),
    });
    s.push_str(r#"<section id="phases"><h2>Round time by phase</h2>"#);
    s.push_str(&legend(&[
        ("publish", "c-publish", false),
        ("collect", "c-collect", false),
        ("aggregate", "c-aggregate", false),
        ("evaluate", "c-evaluate", false),
        ("other (distil, fuse, …)", "c-other", false),
    ]));
    s.push_str(&svg::bar_chart(
        "chart-phases",
        "round time by phase",
        &cats,
        &bars,
        true,
        &|v| ms(v),
    ));
    s.push_str("</section>");
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn rounds_section(s: &mut String, h: &History) {
    s.push_str(r#"<section id="rounds"><h2>Rounds: accepted, rejected, excluded, guard</h2><div class="scroll"><table><thead><tr><th class="num">round</th><th>outcome</th><th class="num">accepted</th><th class="num">rejected</th><th>rejected by reason (messages)</th><th class="num">excluded</th><th>excluded by reason</th><th class="num">clipped</th><th class="num">flagged</th><th class="num">late</th><th class="num">resent</th><th class="num">lost</th><th>guard</th><th>guard reason / offenders</th><th class="num">time</th></tr></thead><tbody>"#);
    let skip = h.rounds.len().saturating_sub(TABLE_ROUNDS);
    for rs in h.rounds.iter().skip(skip).rev() {
        let r = &rs.report;
        let (verdict, why) = match &r.guard {
            None => (String::new(), String::new()),
            Some(g) => {
                let score = |x: &Option<crate::report::Score>| {
                    x.as_ref()
                        .map_or_else(|| "–".to_string(), |x| format!("{:.4}", x.accuracy))
                };
                let mut why = g.reason.clone().unwrap_or_default();
                for o in &g.offenders {
                    if !why.is_empty() {
                        why.push_str("; ");
                    }
                    why.push_str(&format!("{}: {}", o.client, o.evidence.join(", ")));
                }
                (
                    format!("{} {} → {}", g.verdict, score(&g.before), score(&g.after)),
                    why,
                )
            }
        };
        let outcome_class = if r.outcome.starts_with("skipped") {
            "skipped"
        } else {
            r.outcome.as_str()
        };
        let _ = write!(
            s,
            r#"<tr><td class="num">{}</td><td class="o-{}">{}</td><td class="num">{}/{}</td><td class="num">{}</td><td class="why">{}</td><td class="num">{}</td><td class="why">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td>{}</td><td class="why">{}</td><td class="num">{}</td></tr>"#,
            r.round,
            esc(outcome_class),
            esc(&r.outcome),
            r.accepted,
            r.registered,
            rs.rejected_clients,
            esc(&counts(&rs.rejected_codes)),
            rs.excluded_codes.values().sum::<u64>(),
            esc(&counts(&rs.excluded_codes)),
            r.clipped.len(),
            r.flagged.len(),
            rs.late_messages,
            r.resent,
            r.lost.len(),
            esc(&verdict),
            esc(&why),
            ms(r.duration_ms as f64)
        );
    }
    s.push_str("</tbody></table></div>");
    if skip > 0 {
        let _ = write!(
            s,
            r#"<p class="note">The latest {TABLE_ROUNDS} of {} rounds; every round is in its JSON report.</p>"#,
            h.rounds.len()
        );
    }
    s.push_str(r#"<p class="note">rejected = clients with refused messages (signature, round, digest, …); excluded = accepted deltas the aggregation rule left out; clipped = scaled down; flagged = norm outliers; late = for a closed round, not blamed.</p></section>"#);
}

fn guard_cells(g: &Option<crate::report::GuardOutcome>, fallback: &str) -> String {
    use crate::report::GuardOutcome;
    match g {
        None => format!(
            r#"<td></td><td class="num"></td><td class="num"></td><td class="why">{}</td>"#,
            esc(fallback)
        ),
        Some(o) => {
            let (before, after, best) = match o {
                GuardOutcome::Accepted {
                    before,
                    after,
                    best,
                    ..
                }
                | GuardOutcome::RolledBack {
                    before,
                    after,
                    best,
                    ..
                } => (*before, *after, *best),
            };
            let (label, class) = if o.accepted() {
                ("kept", "s-accepted")
            } else {
                ("rolled back", "s-rejected")
            };
            format!(
                r#"<td class="{class}">{label}</td><td class="num">{} → {}</td><td class="num">{}</td><td class="why">{}</td>"#,
                acc(Some(before)),
                acc(Some(after)),
                acc(Some(best).filter(|b| *b > 0.0)),
                esc(o.reason())
            )
        }
    }
}

fn coevolution_section(s: &mut String, h: &History) {
    if !h.rounds.iter().any(|r| r.report.coevolution.is_some()) {
        return;
    }
    s.push_str(r#"<section id="coevolution"><h2>Distillation and fusion per round</h2><p class="note">Distillation: teacher → student before the round. Fusion: students → teacher after it. Each step is kept only if validation accuracy holds (before → after, against the best so far).</p><div class="scroll"><table><thead><tr><th class="num">round</th><th>distillation</th><th class="num">val. accuracy</th><th class="num">best</th><th>why</th><th>fusion</th><th class="num">val. accuracy</th><th class="num">best</th><th>why</th></tr></thead><tbody>"#);
    let skip = h.rounds.len().saturating_sub(TABLE_ROUNDS);
    for rs in h.rounds.iter().skip(skip).rev() {
        let r = &rs.report;
        let (d, f) = match &r.coevolution {
            None => (None, None),
            Some(c) => (c.distillation.clone(), c.fusion.clone()),
        };
        let _ = write!(
            s,
            r#"<tr><td class="num">{}</td>{}{}</tr>"#,
            r.round,
            guard_cells(&d, "not run"),
            guard_cells(&f, &format!("not run: round {}", r.outcome))
        );
    }
    s.push_str("</tbody></table></div></section>");
}

fn row_html(s: &mut String, row: &ClientRow) {
    let _ = write!(
        s,
        r#"<tr><td>{}</td><td class="s-{st}">{st}</td><td class="why">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td></tr>"#,
        esc(&row.client),
        esc(&row.reason),
        opt(row.samples),
        num(row.local_loss, 4),
        num(row.local_accuracy, 4),
        row.train_ms.map_or_else(String::new, |v| ms(v as f64)),
        row.bytes_up.map_or_else(String::new, |v| bytes(v as f64)),
        row.bytes_down.map_or_else(String::new, |v| bytes(v as f64)),
        num(row.delta_norm, 3),
        num(row.trust_weight, 3),
        st = row.status.as_str(),
    );
}

fn latest_clients_section(s: &mut String, h: &History) {
    let Some(last) = h.rounds.last() else { return };
    let mut rows: Vec<&ClientRow> = h.latest_rows.iter().collect();
    // What needs a look first: trouble, then clipped, then the largest deltas.
    rows.sort_by(|a, b| {
        b.status
            .is_trouble()
            .cmp(&a.status.is_trouble())
            .then(
                (b.status == Status::Clipped || !b.reason.is_empty())
                    .cmp(&(a.status == Status::Clipped || !a.reason.is_empty())),
            )
            .then(
                b.delta_norm
                    .unwrap_or(f64::NEG_INFINITY)
                    .total_cmp(&a.delta_norm.unwrap_or(f64::NEG_INFINITY)),
            )
    });
    let _ = write!(
        s,
        r#"<section id="clients-latest"><h2>Clients in round {} ({} rows)</h2><p class="note">Each client's contribution: samples, local training, bytes, delta norm, and its status (accepted, clipped, excluded by the rule, rejected at verification) with the reason. Trouble first, then by delta norm.</p><div class="scroll"><table><thead><tr><th>client</th><th>status</th><th>reason</th><th class="num">samples</th><th class="num">local loss</th><th class="num">local acc.</th><th class="num">train</th><th class="num">up</th><th class="num">down</th><th class="num">delta norm</th><th class="num">trust weight</th></tr></thead><tbody>"#,
        last.report.round,
        rows.len()
    );
    let n = rows.len();
    if n <= LATEST_TOP + LATEST_BOTTOM {
        for r in &rows {
            row_html(s, r);
        }
    } else {
        for r in &rows[..LATEST_TOP] {
            row_html(s, r);
        }
        let _ = write!(
            s,
            r#"<tr class="gap"><td colspan="11">… {} rows not shown (all in the CSV) …</td></tr>"#,
            n - LATEST_TOP - LATEST_BOTTOM
        );
        for r in &rows[n - LATEST_BOTTOM..] {
            row_html(s, r);
        }
    }
    let with_delta: Vec<&&ClientRow> = rows.iter().filter(|r| r.samples.is_some()).collect();
    let mean = |f: &dyn Fn(&ClientRow) -> Option<f64>| {
        let v: Vec<f64> = with_delta
            .iter()
            .filter_map(|r| f(r))
            .filter(|x| x.is_finite())
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rows {
        *by_status.entry(r.status.as_str()).or_default() += 1;
    }
    let status_text: Vec<String> = by_status.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = write!(
        s,
        r#"<tr class="total"><td>all {n}</td><td colspan="2">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num"></td></tr>"#,
        esc(&status_text.join(", ")),
        with_delta.iter().filter_map(|r| r.samples).sum::<u64>(),
        num(mean(&|r| r.local_loss), 4),
        num(mean(&|r| r.local_accuracy), 4),
        mean(&|r| r.train_ms.map(|v| v as f64)).map_or_else(String::new, ms),
        bytes(with_delta.iter().filter_map(|r| r.bytes_up).sum::<u64>() as f64),
        bytes(with_delta.iter().filter_map(|r| r.bytes_down).sum::<u64>() as f64),
        num(mean(&|r| r.delta_norm), 3),
    );
    s.push_str(r#"</tbody></table></div><p class="note">Totals row: sums of samples and bytes, means of loss, accuracy, train time and norm over accepted deltas.</p></section>"#);
}

fn all_clients_section(s: &mut String, h: &History) {
    if h.clients.is_empty() {
        return;
    }
    let mut list: Vec<(&String, &ClientTotals)> = h.clients.iter().collect();
    list.sort_by(|a, b| {
        b.1.trouble()
            .cmp(&a.1.trouble())
            .then(b.1.bytes_up.cmp(&a.1.bytes_up))
            .then(a.0.cmp(b.0))
    });
    let n = list.len();
    let _ = write!(
        s,
        r#"<section id="clients-all"><h2>Clients across all rounds ({n})</h2><div class="scroll"><table><thead><tr><th>client</th><th class="num">accepted</th><th class="num">clipped</th><th class="num">excluded</th><th class="num">rejected</th><th class="num">rejected msgs</th><th class="num">flagged</th><th class="num">samples</th><th class="num">up</th><th class="num">down</th><th>last status</th><th class="num">last round</th><th class="num">last loss</th><th class="num">last norm</th></tr></thead><tbody>"#
    );
    let get = |t: &ClientTotals, st: Status| t.by_status.get(&st).copied().unwrap_or(0);
    for (c, t) in list.iter().take(CLIENTS_TOP) {
        let last = t.last_status.map_or("", Status::as_str);
        let reason = if t.last_reason.is_empty() {
            String::new()
        } else {
            format!(": {}", t.last_reason)
        };
        let _ = write!(
            s,
            r#"<tr><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="s-{last} why">{last}{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td></tr>"#,
            esc(c),
            get(t, Status::Accepted),
            get(t, Status::Clipped),
            get(t, Status::Excluded),
            get(t, Status::Rejected),
            t.rejected_messages,
            t.flagged,
            t.samples,
            bytes(t.bytes_up as f64),
            bytes(t.bytes_down as f64),
            esc(&reason),
            t.last_round,
            num(t.last_loss, 4),
            num(t.last_norm, 3),
        );
    }
    if n > CLIENTS_TOP {
        let _ = write!(
            s,
            r#"<tr class="gap"><td colspan="14">… {} more clients (all in the CSV) …</td></tr>"#,
            n - CLIENTS_TOP
        );
    }
    let sum = |f: &dyn Fn(&ClientTotals) -> u64| list.iter().map(|(_, t)| f(t)).sum::<u64>();
    let _ = write!(
        s,
        r#"<tr class="total"><td>all {n}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td colspan="4"></td></tr>"#,
        sum(&|t| get(t, Status::Accepted)),
        sum(&|t| get(t, Status::Clipped)),
        sum(&|t| get(t, Status::Excluded)),
        sum(&|t| get(t, Status::Rejected)),
        sum(&|t| t.rejected_messages),
        sum(&|t| t.flagged),
        sum(&|t| t.samples),
        bytes(sum(&|t| t.bytes_up) as f64),
        bytes(sum(&|t| t.bytes_down) as f64),
    );
    s.push_str(r#"</tbody></table></div><p class="note">Counts are rounds (messages for "rejected msgs"). Clients with rejections, exclusions or outlier deltas first, then by bytes sent.</p></section>"#);
}

#[cfg(test)]
mod tests;
