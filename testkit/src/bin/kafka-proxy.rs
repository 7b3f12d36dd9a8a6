//! `kafka-proxy --listen HOST:PORT --upstream HOST:PORT [--every SECONDS]`
//!
//! Runs [`KafkaProxy`] in front of a broker started with
//! `--advertised-listener-url tcp://<listen>` and prints, every interval, the broker
//! requests per API key of that interval as a markdown table (requests/s, mean sizes).
//! Used for the broker-request breakdown in docs/benchmarks.md.

use std::time::{Duration, Instant};

use kafka_rpc_testkit::KafkaProxy;

fn main() {
    let mut listen = None;
    let mut upstream = None;
    let mut every = Duration::from_secs(5);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next(),
            "--upstream" => upstream = args.next(),
            // Checked here: `Duration::from_secs_f64` panics on what no `Duration`
            // holds (`inf`, `1e30`), and the loop below would reach it only after
            // the proxy started.
            "--every" => match args.next().and_then(|s| s.parse::<f64>().ok()).map(|s| Duration::try_from_secs_f64(s.max(0.1))) {
                Some(Ok(d)) => every = d,
                _ => {
                    eprintln!("kafka-proxy: --every takes a number of seconds (at least 0.1)");
                    std::process::exit(2);
                }
            },
            _ => {
                eprintln!("usage: kafka-proxy --listen HOST:PORT --upstream HOST:PORT [--every SECONDS]");
                std::process::exit(2);
            }
        }
    }
    let (Some(listen), Some(upstream)) = (listen, upstream) else {
        eprintln!("usage: kafka-proxy --listen HOST:PORT --upstream HOST:PORT [--every SECONDS]");
        std::process::exit(2);
    };
    let proxy = match KafkaProxy::bind_on(&listen) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kafka-proxy: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    proxy.forward_to(&upstream);
    eprintln!("kafka-proxy: {} -> {upstream}", proxy.addr());
    let mut last = proxy.stats();
    let mut at = Instant::now();
    loop {
        std::thread::sleep(every);
        let now = proxy.stats();
        let phase = now.since(&last);
        if !phase.by_api.is_empty() {
            println!("## {:.1} s, {} new connections\n{}", at.elapsed().as_secs_f64(), phase.connections, phase.table_over(Some(at.elapsed().as_secs_f64())));
        }
        last = now;
        at = Instant::now();
    }
}
