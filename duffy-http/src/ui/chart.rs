//! Small SVG charts, written as markup.
//!
//! Why not a plotting crate: plotters' SVG backend lays text out with font
//! metrics, which needs a font stack (`ttf`/`ab_glyph`) at build time and
//! run time, for charts that are a handful of lines and labels. Three
//! dozen lines of SVG keep `cargo build` lean and the output accessible
//! (a `<title>` and an `aria-label` on every chart; the numbers are also
//! in a table beside it).

use maud::{Markup, html};

/// One line (or bar series) of a chart.
pub struct Series {
    /// What it counts (the legend).
    pub name: String,
    /// One value per time bucket, oldest first.
    pub values: Vec<u32>,
}

const W: f64 = 640.0;
const H: f64 = 180.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 20.0;
const TOP: f64 = 10.0;
/// Line colours, in series order; the legend also names each series, so
/// colour is not the only way to tell them apart.
const COLOURS: [&str; 6] = ["#1b6ac9", "#c0392b", "#2e8b57", "#8e44ad", "#d35400", "#555555"];

fn y_of(v: u32, max: u32) -> f64 {
    H - BOTTOM - (f64::from(v) / f64::from(max.max(1))) * (H - BOTTOM - TOP)
}

fn x_of(i: usize, n: usize) -> f64 {
    LEFT + (W - LEFT - 10.0) * (i as f64) / ((n.max(2) - 1) as f64)
}

/// A line chart of `series` over `buckets` time buckets; `x_label` names
/// the time axis ("last 60 minutes").
pub fn lines(title: &str, x_label: &str, series: &[Series]) -> Markup {
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let max = series.iter().flat_map(|s| s.values.iter().copied()).max().unwrap_or(0).max(1);
    html! {
        figure.chart {
            svg viewBox={"0 0 " (W) " " (H)} role="img" aria-label=(title) xmlns="http://www.w3.org/2000/svg" {
                title { (title) }
                line x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(H - BOTTOM) stroke="#888" {}
                line x1=(LEFT) y1=(H - BOTTOM) x2=(W - 10.0) y2=(H - BOTTOM) stroke="#888" {}
                text x="4" y=(TOP + 8.0) font-size="11" { (max) }
                text x="4" y=(H - BOTTOM) font-size="11" { "0" }
                text x=(LEFT) y=(H - 4.0) font-size="11" { (x_label) }
                @for (k, s) in series.iter().enumerate() {
                    @let points = s.values.iter().enumerate()
                        .map(|(i, v)| format!("{:.1},{:.1}", x_of(i, n), y_of(*v, max)))
                        .collect::<Vec<_>>().join(" ");
                    polyline points=(points) fill="none" stroke=(COLOURS[k % COLOURS.len()]) stroke-width="2" {}
                }
            }
            figcaption {
                (title) ": "
                @for (k, s) in series.iter().enumerate() {
                    span.legend {
                        svg.swatch viewBox="0 0 10 10" aria-hidden="true" { rect width="10" height="10" fill=(COLOURS[k % COLOURS.len()]) {} }
                        (s.name) " (now " (s.values.last().copied().unwrap_or(0)) ")"
                    }
                }
            }
        }
    }
}

/// A bar chart of one series per time bucket.
pub fn bars(title: &str, x_label: &str, series: &Series) -> Markup {
    let n = series.values.len().max(1);
    let max = series.values.iter().copied().max().unwrap_or(0).max(1);
    let slot = (W - LEFT - 10.0) / n as f64;
    let total: u64 = series.values.iter().map(|v| u64::from(*v)).sum();
    html! {
        figure.chart {
            svg viewBox={"0 0 " (W) " " (H)} role="img" aria-label=(title) xmlns="http://www.w3.org/2000/svg" {
                title { (title) }
                line x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(H - BOTTOM) stroke="#888" {}
                line x1=(LEFT) y1=(H - BOTTOM) x2=(W - 10.0) y2=(H - BOTTOM) stroke="#888" {}
                text x="4" y=(TOP + 8.0) font-size="11" { (max) }
                text x="4" y=(H - BOTTOM) font-size="11" { "0" }
                text x=(LEFT) y=(H - 4.0) font-size="11" { (x_label) }
                @for (i, v) in series.values.iter().enumerate() {
                    @if *v > 0 {
                        @let y = y_of(*v, max);
                        rect x=(format!("{:.1}", LEFT + slot * i as f64 + 1.0)) y=(format!("{y:.1}"))
                            width=(format!("{:.1}", (slot - 2.0).max(1.0))) height=(format!("{:.1}", H - BOTTOM - y))
                            fill=(COLOURS[0]) { title { (v) } }
                    }
                }
            }
            figcaption { (title) ": " (series.name) ", " (total) " in all" }
        }
    }
}
