//! The sweep's outputs: a CSV, a markdown table and SVG plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::sweep::{Cell, Level};

/// Writes `lock-vs-rpc.csv`, `lock-vs-rpc.md`, `throughput.svg` and `p99.svg` into
/// `dir`; returns their paths.
pub fn write_all(cells: &[Cell], dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let write = |name: &str, text: String| -> Result<PathBuf, String> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    };
    let mut written = vec![write("lock-vs-rpc.csv", csv(cells))?, write("lock-vs-rpc.md", markdown(cells))?];
    let throughput = dir.join("throughput.svg");
    plot(cells, &throughput, "Completed updates/s vs contention", "updates/s", |c| Some(c.per_second))?;
    written.push(throughput);
    let p99 = dir.join("p99.svg");
    plot(cells, &p99, "p99 latency from intended send time vs contention", "p99 (ms)", |c| c.p99_ms)?;
    written.push(p99);
    Ok(written)
}

const COLUMNS: &str = "contender,fenced,stores,concurrency,skew,offered_per_s,completed,failed,updates_per_s,p50_ms,p99_ms,p999_ms,\
order_violations,lost_updates,duplicates,rejected_stale,lock_waits,lock_retries,lock_expiries,lock_timeouts,deadlocks,backlog";

/// The cells as CSV, one line per cell.
pub fn csv(cells: &[Cell]) -> String {
    let mut out = format!("{COLUMNS}\n");
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
    for c in cells {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.0},{},{},{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            c.contender,
            c.fenced,
            c.level.stores,
            c.level.concurrency,
            c.skew.name(),
            c.offered_rate,
            c.completed,
            c.failed,
            c.per_second,
            opt(c.p50_ms),
            opt(c.p99_ms),
            opt(c.p999_ms),
            c.order_violations,
            c.lost_updates,
            c.duplicates,
            c.rejected,
            c.lock_waits,
            c.lock_retries,
            c.lock_expiries,
            c.lock_timeouts,
            c.deadlocks,
            c.backlog
        );
    }
    out
}

/// The cells as a markdown table.
pub fn markdown(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| contention | contender | updates/s | p50 ms | p99 ms | p99.9 ms | failed | order violations | lost | dup | rejected stale | lock waits | retries | expiries | lock timeouts | deadlocks |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into());
    for c in cells {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.level.label(),
            c.contender,
            c.per_second,
            opt(c.p50_ms),
            opt(c.p99_ms),
            opt(c.p999_ms),
            c.failed,
            c.order_violations,
            c.lost_updates,
            c.duplicates,
            c.rejected,
            c.lock_waits,
            c.lock_retries,
            c.lock_expiries,
            c.lock_timeouts,
            c.deadlocks
        );
    }
    out
}

/// One line per contender over the contention levels, log-scaled y.
fn plot(cells: &[Cell], path: &Path, title: &str, y_label: &str, value: impl Fn(&Cell) -> Option<f64>) -> Result<(), String> {
    let mut levels: Vec<Level> = Vec::new();
    let mut contenders: Vec<String> = Vec::new();
    for c in cells {
        if !levels.contains(&c.level) {
            levels.push(c.level);
        }
        if !contenders.contains(&c.contender) {
            contenders.push(c.contender.clone());
        }
    }
    let values: Vec<f64> = cells.iter().filter_map(&value).filter(|v| *v > 0.0).collect();
    let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let (lo, hi) = if values.is_empty() { (0.1, 1.0) } else { (lo / 2.0, hi * 2.0) };
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());

    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let x_max = levels.len().saturating_sub(1).max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.2f64..x_max + 0.2, (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    let labels: Vec<String> = levels.iter().map(Level::label).collect();
    chart
        .configure_mesh()
        .x_labels(levels.len().max(2))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("contention (stores M, concurrent triggers N)")
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, name) in contenders.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = cells
            .iter()
            .filter(|c| &c.contender == name)
            .filter_map(|c| {
                let x = levels.iter().position(|l| *l == c.level)? as f64;
                value(c).filter(|v| *v > 0.0).map(|v| (x, v))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
