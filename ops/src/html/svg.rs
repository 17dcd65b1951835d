//! Hand-written SVG charts for the HTML report: a line chart, bar charts and a heatmap.
//!
//! Why not a plotting crate: the report must be one offline file readable on a phone, so the
//! charts need a `viewBox` (they scale with the page), CSS classes instead of inline colours
//! (one palette in the stylesheet), `<title>` tooltips and stable class names a test can find
//! (`series`, `cell`, `bar`). plotters' SVG backend writes fixed pixel sizes and anonymous
//! paths; the three chart types here are a few hundred lines.

use super::esc;
use std::fmt::Write;

/// Chart width in SVG units. Fonts (17 units, in the page's CSS) are sized for it so that,
/// scaled to a 360-px phone column, axis labels stay about 10 px.
pub const W: f64 = 640.0;
const LEFT: f64 = 92.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 50.0;

/// One line of a line chart.
pub struct Series {
    /// Stable name (`student`, `teacher`, `fedavg`…), the `data-series` attribute.
    pub name: String,
    /// CSS class giving its colour (`c-student`…).
    pub class: &'static str,
    /// (x, y) points; `None` breaks the line (a round without that model).
    pub points: Vec<(f64, Option<f64>)>,
    pub dashed: bool,
}

/// A vertical marker at an x (e.g. a rolled-back round), with its tooltip.
pub struct Marker {
    pub x: f64,
    pub class: &'static str,
    pub title: String,
}

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let k0 = (lo / step).ceil() as i64;
    (k0..k0 + 50)
        .map(|k| k as f64 * step)
        .take_while(|t| *t <= hi + step * 1e-9)
        .collect()
}

/// Integer x ticks for rounds: at most ~10 labels.
fn round_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if hi <= lo {
        return vec![lo];
    }
    let step = ((hi - lo) / 10.0).ceil().max(1.0);
    let step = nice_ticks(0.0, step * 10.0, 10)
        .get(1)
        .copied()
        .unwrap_or(step)
        .max(1.0)
        .ceil();
    let mut t = lo.ceil();
    let mut out = Vec::new();
    while t <= hi && out.len() < 30 {
        out.push(t);
        t += step;
    }
    out
}

struct Frame {
    h: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        let span = (self.x1 - self.x0).max(1e-12);
        LEFT + (x - self.x0) / span * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        let span = (self.y1 - self.y0).max(1e-12);
        self.h - BOTTOM - (y - self.y0) / span * (self.h - TOP - BOTTOM)
    }
}

fn open(s: &mut String, id: &str, h: f64, label: &str) {
    let _ = write!(
        s,
        r#"<svg id="{id}" class="chart" viewBox="0 0 {W} {h}" width="100%" preserveAspectRatio="xMidYMid meet" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
        esc(label)
    );
}

fn axes(
    s: &mut String,
    f: &Frame,
    x_ticks: &[f64],
    y_ticks: &[f64],
    x_label: &str,
    fmt_y: &dyn Fn(f64) -> String,
) {
    for &t in y_ticks {
        let y = f.py(t);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            esc(&fmt_y(t))
        );
    }
    let base = f.h - BOTTOM;
    let _ = write!(
        s,
        r#"<line class="axis" x1="{LEFT}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}"/>"#,
        W - RIGHT
    );
    for &t in x_ticks {
        let x = f.px(t);
        let _ = write!(
            s,
            r#"<text class="tick" x="{x:.1}" y="{:.1}" text-anchor="middle">{t}</text>"#,
            base + 21.0
        );
    }
    let _ = write!(
        s,
        r#"<text class="axis-label" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        f.h - 6.0,
        esc(x_label)
    );
}

/// A line chart over rounds. `y_range` fixes the y axis (accuracy: 0..1); otherwise it spans
/// the data from 0.
pub fn line_chart(
    id: &str,
    label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
    markers: &[Marker],
    fmt_y: &dyn Fn(f64) -> String,
) -> String {
    let h = 300.0;
    let xs = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .chain(markers.iter().map(|m| m.x));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (x0, x1) = if x0.is_finite() {
        (x0, x1.max(x0 + 1.0))
    } else {
        (0.0, 1.0)
    };
    let (y0, y1) = y_range.unwrap_or_else(|| {
        let hi = series
            .iter()
            .flat_map(|s| s.points.iter().filter_map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        (0.0, if hi > 0.0 { hi * 1.05 } else { 1.0 })
    });
    let f = Frame { h, x0, x1, y0, y1 };
    let mut s = String::new();
    open(&mut s, id, h, label);
    axes(
        &mut s,
        &f,
        &round_ticks(x0, x1),
        &nice_ticks(y0, y1, 5),
        "round",
        fmt_y,
    );
    for m in markers {
        let x = f.px(m.x);
        let _ = write!(
            s,
            r#"<line class="marker {}" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}"><title>{}</title></line>"#,
            m.class,
            h - BOTTOM,
            esc(&m.title)
        );
    }
    for ser in series {
        // Consecutive finite points form one polyline; a gap starts another.
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for &(x, y) in &ser.points {
            match y.filter(|v| v.is_finite()) {
                Some(y) => runs.last_mut().map(|r| r.push((x, y))).unwrap_or(()),
                None if runs.last().is_some_and(|r| !r.is_empty()) => runs.push(Vec::new()),
                None => {}
            }
        }
        let dash = if ser.dashed { " dashed" } else { "" };
        let _ = write!(
            s,
            r#"<g class="series-group" data-series="{}">"#,
            esc(&ser.name)
        );
        for run in runs.iter().filter(|r| !r.is_empty()) {
            let pts: Vec<String> = run
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", f.px(x), f.py(y.clamp(y0, y1))))
                .collect();
            let _ = write!(
                s,
                r#"<polyline class="series {}{dash}" data-series="{}" data-points="{}" points="{}"/>"#,
                ser.class,
                esc(&ser.name),
                run.len(),
                pts.join(" ")
            );
        }
        // Dots with tooltips while they stay legible (and the file small).
        let n: usize = runs.iter().map(Vec::len).sum();
        if n <= 200 {
            for &(x, y) in runs.iter().flatten() {
                let _ = write!(
                    s,
                    r#"<circle class="dot {}" cx="{:.1}" cy="{:.1}" r="3"><title>{} round {x}: {}</title></circle>"#,
                    ser.class,
                    f.px(x),
                    f.py(y.clamp(y0, y1)),
                    esc(&ser.name),
                    esc(&fmt_y(y))
                );
            }
        }
        s.push_str("</g>");
    }
    s.push_str("</svg>");
    s
}

/// One stack (or group member) of a bar chart.
pub struct Bars {
    pub name: String,
    pub class: &'static str,
    /// One value per category.
    pub values: Vec<f64>,
}

/// Bars per category (round): stacked (`stacked`) or side by side.
pub fn bar_chart(
    id: &str,
    label: &str,
    categories: &[u64],
    bars: &[Bars],
    stacked: bool,
    fmt_y: &dyn Fn(f64) -> String,
) -> String {
    let h = 280.0;
    let n = categories.len().max(1);
    let totals: Vec<f64> = (0..n)
        .map(|i| {
            let vals = bars
                .iter()
                .map(|b| b.values.get(i).copied().unwrap_or(0.0).max(0.0));
            if stacked {
                vals.sum()
            } else {
                vals.fold(0.0, f64::max)
            }
        })
        .collect();
    let hi = totals.iter().copied().fold(0.0f64, f64::max);
    let y1 = if hi > 0.0 { hi * 1.05 } else { 1.0 };
    // Categories sit at 0..n-1 with half a slot of margin each side.
    let f = Frame {
        h,
        x0: -0.5,
        x1: n as f64 - 0.5,
        y0: 0.0,
        y1,
    };
    let slot = (W - LEFT - RIGHT) / n as f64;
    let mut s = String::new();
    open(&mut s, id, h, label);
    let x_ticks: Vec<f64> = {
        let step = n.div_ceil(10).max(1);
        (0..n).step_by(step).map(|i| i as f64).collect()
    };
    // Axis ticks are drawn at category indices; label them with the round numbers instead.
    let mut axis = String::new();
    axes(&mut axis, &f, &[], &nice_ticks(0.0, y1, 5), "round", fmt_y);
    s.push_str(&axis);
    for &t in &x_ticks {
        let i = t as usize;
        let _ = write!(
            s,
            r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            f.px(t),
            h - BOTTOM + 21.0,
            categories.get(i).copied().unwrap_or(0)
        );
    }
    let width = (slot * 0.8).max(0.5);
    for (i, &cat) in categories.iter().enumerate() {
        let mut acc = 0.0;
        for (j, b) in bars.iter().enumerate() {
            let v = b.values.get(i).copied().unwrap_or(0.0).max(0.0);
            let (x, w, lo) = if stacked {
                (f.px(i as f64) - width / 2.0, width, acc)
            } else {
                let w = width / bars.len().max(1) as f64;
                (f.px(i as f64) - width / 2.0 + w * j as f64, w, 0.0)
            };
            let (ya, yb) = (f.py(lo), f.py(lo + v));
            let _ = write!(
                s,
                r#"<rect class="bar {}" data-series="{}" x="{x:.2}" y="{yb:.2}" width="{w:.2}" height="{:.2}"><title>round {cat}, {}: {}</title></rect>"#,
                b.class,
                esc(&b.name),
                (ya - yb).max(0.0),
                esc(&b.name),
                esc(&fmt_y(v))
            );
            if stacked {
                acc += v;
            }
        }
    }
    s.push_str("</svg>");
    s
}

/// Colour of an accuracy in [0, 1]: a perceptually ordered ramp (dark purple → teal →
/// yellow, after viridis) so low classes stand out without a legend lookup.
pub fn ramp(v: f64) -> String {
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [68.0, 1.0, 84.0]),
        (0.25, [59.0, 82.0, 139.0]),
        (0.5, [33.0, 145.0, 140.0]),
        (0.75, [94.0, 201.0, 98.0]),
        (1.0, [253.0, 231.0, 37.0]),
    ];
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let k = STOPS
        .windows(2)
        .position(|w| v <= w[1].0)
        .unwrap_or(STOPS.len() - 2);
    let (a, b) = (STOPS[k], STOPS[k + 1]);
    let t = (v - a.0) / (b.0 - a.0);
    let c: Vec<u8> = (0..3)
        .map(|i| (a.1[i] + (b.1[i] - a.1[i]) * t).round() as u8)
        .collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// A heatmap: one row per class, one column per round (`columns` are their labels). Missing
/// values are drawn as hatched empty cells.
pub fn heatmap(id: &str, label: &str, columns: &[String], rows: &[Vec<Option<f64>>]) -> String {
    let ncol = columns.len().max(1);
    let nrow = rows.len().max(1);
    let cell_h = match nrow {
        0..=20 => 22.0,
        21..=40 => 12.0,
        _ => 8.0,
    };
    let left = 48.0;
    let h = TOP + nrow as f64 * cell_h + BOTTOM;
    let cw = (W - left - RIGHT) / ncol as f64;
    let mut s = String::new();
    open(&mut s, id, h, label);
    let label_every = if nrow > 20 { 5 } else { 1 };
    for (ri, row) in rows.iter().enumerate() {
        let y = TOP + ri as f64 * cell_h;
        if ri % label_every == 0 {
            let _ = write!(
                s,
                r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{ri}</text>"#,
                left - 4.0,
                y + cell_h * 0.75
            );
        }
        for (ci, v) in row.iter().enumerate() {
            let x = left + ci as f64 * cw;
            let col = columns.get(ci).map_or("", String::as_str);
            match v {
                Some(v) => {
                    let _ = write!(
                        s,
                        r#"<rect class="cell" x="{x:.2}" y="{y:.1}" width="{:.2}" height="{cell_h}" fill="{}"><title>class {ri}, round {}: {v:.4}</title></rect>"#,
                        cw + 0.05,
                        ramp(*v),
                        esc(col)
                    );
                }
                None => {
                    let _ = write!(
                        s,
                        r#"<rect class="cell missing" x="{x:.2}" y="{y:.1}" width="{:.2}" height="{cell_h}"><title>class {ri}, round {}: no value</title></rect>"#,
                        cw + 0.05,
                        esc(col)
                    );
                }
            }
        }
    }
    let step = ncol.div_ceil(10).max(1);
    for ci in (0..ncol).step_by(step) {
        let _ = write!(
            s,
            r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + (ci as f64 + 0.5) * cw,
            TOP + nrow as f64 * cell_h + 21.0,
            esc(columns.get(ci).map_or("", String::as_str))
        );
    }
    let _ = write!(
        s,
        r#"<text class="axis-label" x="{:.1}" y="{:.1}" text-anchor="middle">round</text>"#,
        left + (W - left - RIGHT) / 2.0,
        h - 6.0
    );
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_runs_dark_to_bright() {
        assert_eq!(ramp(0.0), "#440154");
        assert_eq!(ramp(1.0), "#fde725");
        assert_eq!(ramp(f64::NAN), "#440154");
        assert_eq!(ramp(7.0), "#fde725");
    }

    #[test]
    fn a_gap_splits_the_line_and_every_point_is_kept() {
        let s = line_chart(
            "acc",
            "accuracy",
            &[Series {
                name: "student".into(),
                class: "c-student",
                points: vec![
                    (1.0, Some(0.1)),
                    (2.0, Some(0.2)),
                    (3.0, None),
                    (4.0, Some(0.4)),
                ],
                dashed: false,
            }],
            Some((0.0, 1.0)),
            &[],
            &|v| format!("{v:.2}"),
        );
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains(r#"data-points="2""#));
        assert_eq!(s.matches("<circle").count(), 3);
        assert!(s.contains("viewBox=\"0 0 640 300\""));
    }

    #[test]
    fn heatmap_has_one_cell_per_value() {
        let rows = vec![vec![Some(0.5), None, Some(1.0)]; 4];
        let cols: Vec<String> = (1..=3).map(|r| r.to_string()).collect();
        let s = heatmap("h", "per class", &cols, &rows);
        assert_eq!(s.matches(r#"class="cell"#).count(), 12);
        assert_eq!(s.matches("cell missing").count(), 4);
    }

    #[test]
    fn ticks_are_round_numbers() {
        let t = nice_ticks(0.0, 1.0, 5);
        assert_eq!(t.len(), 6);
        assert!(t
            .iter()
            .zip([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
            .all(|(a, b)| (a - b).abs() < 1e-9));
        assert_eq!(round_ticks(1.0, 5.0), vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(round_ticks(1.0, 1000.0).len() <= 12);
    }
}
