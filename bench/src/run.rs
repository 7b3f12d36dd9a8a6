//! Drives one workload against one contender, open-loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::contender::{Contender, Counters};
use crate::audit::Told;
use crate::workload::{Amount, KeyPicker, Sequencer, Update, Workload, XorShift};

/// What a run measured, before the final rows are checked.
pub struct Measured {
    /// Latency from each trigger's intended send time to its outcome, in microseconds.
    pub latency: Histogram<u64>,
    /// From the first intended send time to the last outcome.
    pub elapsed: Duration,
    /// What each store's callers were told.
    pub told: Told,
    /// The first failure, to show why a cell has failures.
    pub first_error: Option<String>,
    /// Triggers scheduled within a timed run that were never sent because every task
    /// was still busy when the time was up: the contender's backlog.
    pub backlog: u64,
}

/// Runs `workload` against `contender` with `workload.concurrency` trigger tasks,
/// recording outcomes in `counters`.
///
/// Trigger `j` (counted over all tasks) is meant to be sent at `start + j / rate`. A
/// free task takes the next `j`, waits for that instant if it is still ahead, and
/// sends; if every task is busy past it, the trigger goes out late and its latency
/// still counts from the intended instant.
pub async fn drive(contender: Arc<dyn Contender>, workload: &Workload, counters: Arc<Counters>, seed: u64) -> Measured {
    let picker = Arc::new(KeyPicker::new(workload.stores, workload.skew));
    let sequencer = Arc::new(Sequencer::new(workload.stores));
    let told = Arc::new(Told::new(workload.stores));
    let next = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let interval = Duration::from_secs_f64(1.0 / workload.rate.max(1e-3));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(workload.concurrency);
    for task in 0..workload.concurrency.max(1) {
        let (contender, counters, picker, sequencer, told, next, first_error) = (
            Arc::clone(&contender),
            Arc::clone(&counters),
            Arc::clone(&picker),
            Arc::clone(&sequencer),
            Arc::clone(&told),
            Arc::clone(&next),
            Arc::clone(&first_error),
        );
        let (amount, payload) = (workload.amount, workload.payload);
        tasks.push(tokio::spawn(async move {
            let mut rng = XorShift::new(seed ^ (task as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut latency = new_histogram();
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let intended = start + interval.mul_f64(j as f64);
                // A timed run also ends at its wall-clock end: a contender that fell
                // behind leaves the rest of its schedule unsent (reported as backlog).
                let done = match amount {
                    Amount::Count(n) => j >= n,
                    Amount::Duration(d) => intended >= start + d || start.elapsed() >= d,
                };
                if done {
                    break;
                }
                tokio::time::sleep_until(intended).await;
                let store_id = picker.pick(&mut rng);
                let radius_m = 500 + (rng.next_u64() % 2_500) as i32;
                let payload = vec![(j % 251) as u8; payload];
                let seq = sequencer.issue(store_id);
                let outcome = contender.start(Update { store_id, seq, radius_m, payload }).await;
                latency.saturating_record(intended.elapsed().as_micros() as u64);
                if let Err(e) = &outcome {
                    let mut first = first_error.lock().unwrap_or_else(|p| p.into_inner());
                    first.get_or_insert_with(|| e.message.clone());
                }
                counters.record(&outcome);
                told.record(store_id, seq, &outcome);
            }
            latency
        }));
    }
    let mut latency = new_histogram();
    for task in tasks {
        // A task that panicked lost its histogram; its triggers were still counted.
        if let Ok(h) = task.await {
            let _ = latency.add(h);
        }
    }
    let elapsed = start.elapsed();
    let backlog = match workload.amount {
        Amount::Count(_) => 0,
        Amount::Duration(d) => {
            let scheduled = (d.as_secs_f64() * workload.rate).ceil() as u64;
            // Each task took one slot past the end when it stopped.
            let taken = next.load(Ordering::Relaxed).saturating_sub(workload.concurrency.max(1) as u64);
            scheduled.saturating_sub(taken)
        }
    };
    let first_error = first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    // Every task has ended, so this is the only reference left.
    let told = Arc::try_unwrap(told).unwrap_or_else(|shared| shared.snapshot());
    Measured { latency, elapsed, told, first_error, backlog }
}

/// Microseconds from 1 µs to 10 minutes, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}
