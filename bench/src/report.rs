//! The sweep's outputs: a CSV, a markdown table and SVG plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::sweep::{Cell, Correctness, Level, LockStats};

/// Writes `lock-vs-rpc.csv` (one line per cell and round), `lock-vs-rpc.md` (one line
/// per cell over its rounds), `throughput.svg` and `p99.svg` into `dir`; returns
/// their paths.
pub fn write_all(cells: &[Cell], dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let write = |name: &str, text: String| -> Result<PathBuf, String> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    };
    let summaries = summarize(cells);
    let mut written = vec![write("lock-vs-rpc.csv", csv(cells))?, write("lock-vs-rpc.md", markdown(&summaries))?];
    let throughput = dir.join("throughput.svg");
    plot(&summaries, &throughput, "Updates written/s vs contention (median of rounds)", "updates/s", |s| Some(s.per_second.median))?;
    written.push(throughput);
    let p99 = dir.join("p99.svg");
    plot(&summaries, &p99, "p99 latency from intended send time vs contention (median of rounds)", "p99 (ms)", |s| s.p99_ms)?;
    written.push(p99);
    Ok(written)
}

/// The median, lowest and highest of some rounds' figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The middle figure (the mean of the two middle ones for an even count).
    pub median: f64,
    /// The lowest.
    pub min: f64,
    /// The highest.
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Option<Spread> {
        values.sort_by(f64::total_cmp);
        let (min, max) = (*values.first()?, *values.last()?);
        let mid = values.len() / 2;
        let median = if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 };
        Some(Spread { median, min, max })
    }
}

/// One contender at one level over all its rounds.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Contention.
    pub level: Level,
    /// Contender name.
    pub contender: String,
    /// Rounds summarised.
    pub rounds: usize,
    /// Updates written per second.
    pub per_second: Spread,
    /// Median of the rounds' rejected updates per second.
    pub rejected_per_second: f64,
    /// Median of the rounds' p50, in ms.
    pub p50_ms: Option<f64>,
    /// Median of the rounds' p99, in ms.
    pub p99_ms: Option<f64>,
    /// Failed updates over all rounds.
    pub failed: u64,
    /// Order and loss over all rounds, summed; None where not measured.
    pub correctness: Option<Correctness>,
    /// What the locks did over all rounds.
    pub locks: LockStats,
}

/// The cells grouped by level and contender, in the order they first ran.
pub fn summarize(cells: &[Cell]) -> Vec<Summary> {
    let mut keys: Vec<(Level, &str)> = Vec::new();
    for c in cells {
        if !keys.contains(&(c.level, c.contender.as_str())) {
            keys.push((c.level, c.contender.as_str()));
        }
    }
    keys.into_iter()
        .filter_map(|(level, contender)| {
            let rounds: Vec<&Cell> = cells.iter().filter(|c| c.level == level && c.contender == contender).collect();
            let median = |f: &dyn Fn(&Cell) -> Option<f64>| Spread::of(rounds.iter().filter_map(|c| f(c)).collect()).map(|s| s.median);
            let sum = |f: &dyn Fn(&Cell) -> u64| rounds.iter().map(|c| f(c)).sum();
            let correctness = rounds
                .iter()
                .map(|c| c.correctness)
                .try_fold(Correctness::default(), |total, c| c.map(|c| total.add(&c)));
            Some(Summary {
                level,
                contender: contender.to_string(),
                rounds: rounds.len(),
                per_second: Spread::of(rounds.iter().map(|c| c.per_second).collect())?,
                rejected_per_second: median(&|c| Some(c.rejected_per_second)).unwrap_or(0.0),
                p50_ms: median(&|c| c.p50_ms),
                p99_ms: median(&|c| c.p99_ms),
                failed: sum(&|c| c.failed),
                correctness,
                locks: rounds.iter().fold(LockStats::default(), |total, c| total.add(&c.locks)),
            })
        })
        .collect()
}

const COLUMNS: &str = "contender,fenced,stores,concurrency,skew,round,offered_per_s,completed,failed,written_per_s,rejected_per_s,\
p50_ms,p99_ms,p999_ms,ahead,stale,duplicates,rejected_stale,conflicts,lost,extra,stale_at_end,out_of_call_order,\
lock_waits,lock_retries,lock_expiries,lock_timeouts,deadlocks,backlog";

/// The cells as CSV, one line per cell and round; correctness fields are empty where
/// they were not measured.
pub fn csv(cells: &[Cell]) -> String {
    let mut out = format!("{COLUMNS}\n");
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
    for c in cells {
        let checked = match c.correctness {
            Some(k) => format!(
                "{},{},{},{},{},{},{},{},{}",
                k.ahead,
                k.stale,
                k.duplicates,
                k.rejected,
                k.conflicts,
                k.audit.lost,
                k.audit.extra,
                k.audit.stale_at_end,
                k.call_order.map(|n| n.to_string()).unwrap_or_default()
            ),
            None => ",,,,,,,,".to_string(),
        };
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{:.0},{},{},{:.1},{:.1},{},{},{},{},{},{},{},{},{},{}",
            c.contender,
            c.fenced,
            c.level.stores,
            c.level.concurrency,
            c.skew.name(),
            c.round,
            c.offered_rate,
            c.completed,
            c.failed,
            c.per_second,
            c.rejected_per_second,
            opt(c.p50_ms),
            opt(c.p99_ms),
            opt(c.p999_ms),
            checked,
            c.locks.waits,
            c.locks.retries,
            c.locks.expiries,
            c.locks.timeouts,
            c.locks.deadlocks,
            c.backlog
        );
    }
    out
}

/// The summaries as a markdown table; "–" marks what was not measured.
pub fn markdown(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| contention | contender | written/s (median) | range | rejected/s | p50 ms | p99 ms | failed | out of trigger order (ahead + stale) | stale at end | lost | extra | dup | conflicts | out of call order | lock waits | retries | expiries | lock timeouts | deadlocks |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into());
    for s in summaries {
        let checked = match s.correctness {
            Some(k) => format!(
                "{} ({} + {}) | {} | {} | {} | {} | {} | {}",
                k.out_of_order(),
                k.ahead,
                k.stale,
                k.audit.stale_at_end,
                k.audit.lost,
                k.audit.extra,
                k.duplicates,
                k.conflicts,
                k.call_order.map(|n| n.to_string()).unwrap_or_else(|| "–".into())
            ),
            None => "– | – | – | – | – | – | –".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0}–{:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.level.label(),
            s.contender,
            s.per_second.median,
            s.per_second.min,
            s.per_second.max,
            s.rejected_per_second,
            opt(s.p50_ms),
            opt(s.p99_ms),
            s.failed,
            checked,
            s.locks.waits,
            s.locks.retries,
            s.locks.expiries,
            s.locks.timeouts,
            s.locks.deadlocks
        );
    }
    out
}

/// One line per contender over the contention levels, log-scaled y.
fn plot(cells: &[Summary], path: &Path, title: &str, y_label: &str, value: impl Fn(&Summary) -> Option<f64>) -> Result<(), String> {
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
