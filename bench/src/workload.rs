//! What the triggers look like: which store each one hits, its per-store sequence
//! number, and when it is meant to be sent.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// How triggers spread over stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Skew {
    /// Every store equally likely.
    Uniform,
    /// Zipf with exponent 1.1 (pgbench's `random_zipfian(1, M, 1.1)`): a few stores get most triggers.
    Zipf,
    /// Every trigger hits store 1.
    OneHot,
}

impl Skew {
    /// The name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Skew::Uniform => "uniform",
            Skew::Zipf => "zipf",
            Skew::OneHot => "one-hot",
        }
    }
}

/// Zipf exponent shared with the pgbench script.
pub const ZIPF_EXPONENT: f64 = 1.1;

/// How long a cell runs.
#[derive(Clone, Copy, Debug)]
pub enum Amount {
    /// This many triggers in all.
    Count(u64),
    /// Triggers are scheduled for this long.
    Duration(Duration),
}

/// One cell's workload.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Stores M; ids are `1..=M`.
    pub stores: u64,
    /// Concurrent triggers N: at most this many updates are outstanding at once.
    pub concurrency: usize,
    /// Key skew.
    pub skew: Skew,
    /// Count or duration.
    pub amount: Amount,
    /// Payload bytes each trigger carries and writes into the row.
    pub payload: usize,
    /// Offered load in triggers per second. Trigger `j` is meant to be sent at
    /// `start + j / rate`; latency counts from then, so a contender that falls
    /// behind is charged for the wait (no coordinated omission).
    pub rate: f64,
}

/// One update of one store's delivery radius.
#[derive(Clone, Debug)]
pub struct Update {
    /// The store, `1..=M`.
    pub store_id: i64,
    /// This trigger's position among the store's triggers, from 1, issued at trigger time.
    pub seq: i64,
    /// The radius the trigger asks for.
    pub radius_m: i32,
    /// Opaque bytes of the configured size.
    pub payload: Vec<u8>,
}

/// Picks stores according to a [`Skew`].
pub struct KeyPicker {
    stores: u64,
    skew: Skew,
    /// Cumulative Zipf probabilities, for `Skew::Zipf` only.
    cdf: Vec<f64>,
}

impl KeyPicker {
    /// A picker over stores `1..=stores`.
    pub fn new(stores: u64, skew: Skew) -> KeyPicker {
        let cdf = if skew == Skew::Zipf {
            let weights: Vec<f64> = (1..=stores).map(|k| 1.0 / (k as f64).powf(ZIPF_EXPONENT)).collect();
            let total: f64 = weights.iter().sum();
            let mut acc = 0.0;
            weights.iter().map(|w| {
                acc += w / total;
                acc
            }).collect()
        } else {
            Vec::new()
        };
        KeyPicker { stores: stores.max(1), skew, cdf }
    }

    /// A store id drawn with `rng`.
    pub fn pick(&self, rng: &mut XorShift) -> i64 {
        match self.skew {
            Skew::Uniform => (rng.next_u64() % self.stores) as i64 + 1,
            Skew::OneHot => 1,
            Skew::Zipf => {
                let u = rng.unit();
                self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as i64 + 1
            }
        }
    }
}

/// Per-store sequence numbers: a trigger's number is its place among its store's
/// triggers in the order they happened, the order every contender is judged by. The
/// number is issued and the trigger handed to its contender at once, with nothing
/// held in between, for every contender alike.
pub struct Sequencer {
    next: Vec<AtomicI64>,
}

impl Sequencer {
    /// Counters for stores `1..=stores`, all at 0.
    pub fn new(stores: u64) -> Sequencer {
        Sequencer { next: (0..stores.max(1)).map(|_| AtomicI64::new(0)).collect() }
    }

    /// Issues the store's next sequence number.
    pub fn issue(&self, store_id: i64) -> i64 {
        self.next[(store_id - 1) as usize].fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A small, fast, deterministic generator: the workload must not depend on a
/// random-number crate's version to be reproducible.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (0 is replaced, since xorshift would stay at 0).
    pub fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_low_ids_and_stays_in_range() {
        let picker = KeyPicker::new(1000, Skew::Zipf);
        let mut rng = XorShift::new(7);
        let picks: Vec<i64> = (0..20_000).map(|_| picker.pick(&mut rng)).collect();
        assert!(picks.iter().all(|&p| (1..=1000).contains(&p)));
        let first = picks.iter().filter(|&&p| p == 1).count();
        let hundredth = picks.iter().filter(|&&p| p == 100).count();
        assert!(first > 10 * hundredth.max(1), "store 1 {first} times, store 100 {hundredth} times");
    }

    #[test]
    fn sequence_numbers_count_per_store() {
        let s = Sequencer::new(3);
        assert_eq!(s.issue(2), 1);
        assert_eq!(s.issue(2), 2);
        assert_eq!(s.issue(3), 1);
    }
}
