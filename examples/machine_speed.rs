//! How fast this machine runs right now: an anchor for figures that cannot be ratios.
//!
//! ```text
//! cargo run --release --example machine_speed
//! ```
//!
//! Issue #9's embedded target is an absolute rate (500,000 requests a second), and on a
//! shared virtual machine the same binary runs 25 % slower in one hour than in another.
//! This prints three costs measured in a second or so, none involving kafka-rpc, so that
//! a rate taken beside them can be read against how fast the machine was at the time:
//!
//! - `memory_ns`: one dependent load at a random place in 64 MiB, the size of the embedded
//!   broker's logs under the load generator (twice the L3 cache: DRAM and TLB misses);
//! - `compute_ns`: one step of a dependent multiply-xor chain (the core's clock);
//! - `handoff_ns`: one round trip of a cache line between two threads spinning on it (what
//!   every hand-off between the client's, broker's and server's tasks pays).
//!
//! Each is the best of three tries, so a moment's interruption does not count.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let memory = best_of_three(memory_ns);
    let compute = best_of_three(compute_ns);
    let handoff = best_of_three(handoff_ns);
    println!("machine: memory_ns {memory:.1} compute_ns {compute:.3} handoff_ns {handoff:.0}");
}

fn best_of_three(f: fn() -> f64) -> f64 {
    (0..3).map(|_| f()).fold(f64::INFINITY, f64::min)
}

/// A random cycle through 64 MiB of `usize` slots, followed for 4 million steps: each
/// load's address comes from the one before, so misses cannot overlap.
fn memory_ns() -> f64 {
    const SLOTS: usize = 64 << 20 >> 3;
    const STEPS: usize = 4_000_000;
    let mut order: Vec<usize> = (0..SLOTS).collect();
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    for i in (1..SLOTS).rev() {
        seed = xorshift(seed);
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    let mut next = vec![0usize; SLOTS];
    for pair in order.windows(2) {
        next[pair[0]] = pair[1];
    }
    next[order[SLOTS - 1]] = order[0];
    let mut at = order[0];
    let start = Instant::now();
    for _ in 0..STEPS {
        at = next[at];
    }
    black_box(at);
    start.elapsed().as_nanos() as f64 / STEPS as f64
}

fn compute_ns() -> f64 {
    const STEPS: u64 = 100_000_000;
    let mut x = black_box(1_u64);
    let start = Instant::now();
    for _ in 0..STEPS {
        x = xorshift(x.wrapping_mul(0x2545_F491_4F6C_DD1D));
    }
    black_box(x);
    start.elapsed().as_nanos() as f64 / STEPS as f64
}

/// Two threads take turns incrementing one counter: each turn moves its cache line to the
/// other core. On a machine with one core free this measures scheduling, not the cache.
fn handoff_ns() -> f64 {
    const ROUNDS: u64 = 200_000;
    let line = Arc::new(AtomicU64::new(0));
    let other = Arc::clone(&line);
    let echo = std::thread::spawn(move || {
        let mut seen = 1;
        while seen < 2 * ROUNDS {
            if other.load(Ordering::Acquire) == seen {
                other.store(seen + 1, Ordering::Release);
                seen += 2;
            }
            std::hint::spin_loop();
        }
    });
    let start = Instant::now();
    let mut sent = 0;
    while sent < 2 * ROUNDS {
        line.store(sent + 1, Ordering::Release);
        while line.load(Ordering::Acquire) != sent + 2 {
            std::hint::spin_loop();
        }
        sent += 2;
    }
    let elapsed = start.elapsed();
    // The echo thread ends after its last turn, which the loop above has seen.
    let _ = echo.join();
    elapsed.as_nanos() as f64 / ROUNDS as f64
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}
