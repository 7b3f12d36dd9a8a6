//! The broker's own ceiling, so RPC numbers can be read against what the broker
//! allows at all: measured with plain rskafka (no kafka-rpc code), and with
//! kafka-rpc's `KafkaTransport` (its produce path sets TCP_NODELAY, rskafka's does
//! not, which costs rskafka ~45 ms per mid-sized produce request on loopback).
//!
//! ```text
//! cargo run --release --example broker_ceiling -- --bootstrap 127.0.0.1:9092 [--records 200000] [--batch 100] [--samples 500] [--wait-ms 1] [--client both|rskafka|transport] [--no-reader]
//! ```
//!
//! * throughput: one producer sends `--records` records in batches of `--batch` (one
//!   produce request per batch, one at a time) while a reader on its own connection
//!   fetches them; records/s is counted until the reader has them all, and until
//!   the producer is done. `--no-reader` measures the producer alone.
//! * latency: one record at a time, produce → fetched by a reader polling with the
//!   `--wait-ms` fetch max-wait; p50/p99 over `--samples` records.
//! * round trip (rskafka only): what any client's request-reply costs on this broker.
//!   A responder long-polls topic A and answers each record on topic B; the requester
//!   sends one record at a time to A and waits for its answer on B. Every reader is
//!   already waiting when its record is produced, as an RPC's are, and the one-way
//!   figure printed with it is taken the same way (produce → an already waiting
//!   reader), so their ratio is the broker's own round trip / one-way.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;

use bytes::Bytes;
use kafka_rpc::transport::kafka::{KafkaConfig, KafkaTransport};
use kafka_rpc::transport::{Record as RpcRecord, Transport};

struct Args {
    bootstrap: String,
    records: usize,
    batch: usize,
    samples: usize,
    wait_ms: i32,
    client: String,
    no_reader: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { bootstrap: String::new(), records: 200_000, batch: 100, samples: 500, wait_ms: 1, client: "both".into(), no_reader: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-reader" {
            args.no_reader = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--bootstrap" => args.bootstrap = value,
            "--records" => args.records = num(&value)?,
            "--batch" => args.batch = num(&value)?.max(1),
            "--samples" => args.samples = num(&value)?.max(1),
            "--client" => args.client = value,
            "--wait-ms" => args.wait_ms = value.parse().map_err(|e| format!("--wait-ms {value}: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.bootstrap.is_empty() {
        return Err("--bootstrap host:port is required".into());
    }
    Ok(args)
}

/// Records/s until the reader had everything, and until the producer had sent
/// everything (both while the reader runs).
struct Throughput {
    end_to_end: f64,
    produce: f64,
    elapsed: Duration,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn client(bootstrap: &str) -> Result<Client, Error> {
    let brokers = bootstrap.split(',').map(str::to_string).collect();
    Ok(ClientBuilder::new(brokers).client_id("broker-ceiling").build().await?)
}

async fn partition(c: &Client, topic: &str) -> Result<PartitionClient, Error> {
    Ok(c.partition_client(topic, 0, UnknownTopicHandling::Retry).await?)
}

async fn fresh_topic(c: &Client, prefix: &str) -> Result<String, Error> {
    let topic = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    c.controller_client()?.create_topic(&topic, 1, 1, 10_000).await?;
    Ok(topic)
}

fn now() -> DateTime<Utc> {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    DateTime::<Utc>::from_timestamp_millis(since_epoch.as_millis() as i64).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

fn record(payload: &[u8]) -> Record {
    Record { key: Some(b"key".to_vec()), value: Some(payload.to_vec()), headers: Default::default(), timestamp: now() }
}

async fn throughput(args: &Args) -> Result<Throughput, Error> {
    let admin = client(&args.bootstrap).await?;
    let topic = fresh_topic(&admin, "ceiling-tput").await?;
    let producer = partition(&admin, &topic).await?;
    let reader_client = client(&args.bootstrap).await?;
    let reader = partition(&reader_client, &topic).await?;
    let total = args.records as i64;
    let no_reader = args.no_reader;
    let wait_ms = args.wait_ms;

    let started = Instant::now();
    let read = tokio::spawn(async move {
        let mut next = 0i64;
        if no_reader {
            return Ok::<_, Error>(Instant::now());
        }
        while next < total {
            let (records, _) = reader.fetch_records(next, 1..4 * 1024 * 1024, wait_ms).await?;
            if let Some(last) = records.last() {
                next = last.offset + 1;
            }
        }
        Ok::<_, Error>(Instant::now())
    });
    let payload = vec![b'x'; 100];
    let mut sent = 0;
    while sent < args.records {
        let n = args.batch.min(args.records - sent);
        let batch = (0..n).map(|_| record(&payload)).collect();
        producer.produce(batch, Compression::NoCompression).await?;
        sent += n;
    }
    let produced = started.elapsed();
    let produced_at = Instant::now();
    let done = read.await??.max(produced_at);
    let elapsed = done - started;
    Ok(Throughput { end_to_end: args.records as f64 / elapsed.as_secs_f64(), produce: args.records as f64 / produced.as_secs_f64(), elapsed })
}

async fn latency(args: &Args) -> Result<Histogram<u64>, Error> {
    let admin = client(&args.bootstrap).await?;
    let topic = fresh_topic(&admin, "ceiling-latency").await?;
    let producer = partition(&admin, &topic).await?;
    let reader_client = client(&args.bootstrap).await?;
    let reader = partition(&reader_client, &topic).await?;
    let mut hist = Histogram::<u64>::new(3)?;
    let payload = vec![b'x'; 100];
    let mut next = 0i64;
    for _ in 0..args.samples {
        let started = Instant::now();
        producer.produce(vec![record(&payload)], Compression::NoCompression).await?;
        loop {
            let (records, _) = reader.fetch_records(next, 1..1024 * 1024, args.wait_ms).await?;
            if let Some(last) = records.last() {
                next = last.offset + 1;
                break;
            }
        }
        hist.record(started.elapsed().as_micros() as u64)?;
    }
    Ok(hist)
}

/// A reader that long-polls `topic` from offset 0 on a client of its own and hands on
/// the arrival time of each record, so a record's reader is waiting before it is produced.
async fn waiting_reader(args: &Args, topic: &str) -> Result<tokio::sync::mpsc::UnboundedReceiver<(Instant, Record)>, Error> {
    let reader_client = client(&args.bootstrap).await?;
    let reader = partition(&reader_client, topic).await?;
    let wait_ms = args.wait_ms;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _client = reader_client;
        let mut next = 0i64;
        loop {
            let Ok((records, _)) = reader.fetch_records(next, 1..1024 * 1024, wait_ms).await else { return };
            let arrived = Instant::now();
            for r in records {
                next = r.offset + 1;
                if tx.send((arrived, r.record)).is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// One-way to an already waiting reader, and the round trip through a responder.
async fn round_trip(args: &Args) -> Result<(Histogram<u64>, Histogram<u64>), Error> {
    let admin = client(&args.bootstrap).await?;
    let payload = vec![b'x'; 100];
    let (requests, replies, one_way) =
        (fresh_topic(&admin, "ceiling-rt-a").await?, fresh_topic(&admin, "ceiling-rt-b").await?, fresh_topic(&admin, "ceiling-ow").await?);

    let mut arrivals = waiting_reader(args, &one_way).await?;
    let producer = partition(&admin, &one_way).await?;
    // Let the reader go back to waiting before each record, as the load generator's
    // probe does. A round trip needs no pause: its readers wait while it travels.
    let one_way_hist = time_arrivals(&producer, &mut arrivals, &payload, args.samples, Duration::from_millis(2)).await?;

    let responder_client = client(&args.bootstrap).await?;
    let answer = partition(&responder_client, &replies).await?;
    let mut incoming = waiting_reader(args, &requests).await?;
    let responder = tokio::spawn(async move {
        while let Some((_, request)) = incoming.recv().await {
            let reply = Record { timestamp: now(), ..request };
            if answer.produce(vec![reply], Compression::NoCompression).await.is_err() {
                return;
            }
        }
    });
    let mut answers = waiting_reader(args, &replies).await?;
    let ask = partition(&admin, &requests).await?;
    let rt_hist = time_arrivals(&ask, &mut answers, &payload, args.samples, Duration::ZERO).await?;
    responder.abort();
    Ok((one_way_hist, rt_hist))
}

/// Produces `samples` records one at a time, pausing `settle` before each, and times
/// each from its produce to the next arrival on `arrivals`.
async fn time_arrivals(
    producer: &PartitionClient,
    arrivals: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, Record)>,
    payload: &[u8],
    samples: usize,
    settle: Duration,
) -> Result<Histogram<u64>, Error> {
    let mut hist = Histogram::<u64>::new(3)?;
    for _ in 0..samples {
        if !settle.is_zero() {
            tokio::time::sleep(settle).await;
        }
        let sent = Instant::now();
        producer.produce(vec![record(payload)], Compression::NoCompression).await?;
        let (arrived, _) = arrivals.recv().await.ok_or("a waiting reader stopped")?;
        hist.record(arrived.duration_since(sent).as_micros() as u64)?;
    }
    Ok(hist)
}

async fn transport(args: &Args) -> Result<KafkaTransport, Error> {
    let config = KafkaConfig::builder(&args.bootstrap)
        .client_id("broker-ceiling")
        .fetch_max_wait(Duration::from_millis(args.wait_ms.max(0) as u64))
        .build();
    Ok(KafkaTransport::connect(config).await?)
}

async fn transport_throughput(args: &Args) -> Result<Throughput, Error> {
    let t = transport(args).await?;
    let topic = format!("ceiling-tput-{}", uuid::Uuid::new_v4().simple());
    t.ensure_topic(&topic, 1).await?;
    let mut reader = t.reader(&topic, 0).await?;
    let total = args.records as i64;
    let no_reader = args.no_reader;
    let started = Instant::now();
    let read = tokio::spawn(async move {
        let mut next = 0i64;
        if no_reader {
            return Ok::<_, Error>(Instant::now());
        }
        while next < total {
            let got = reader.fetch(next, Duration::from_millis(100)).await?;
            if let Some(last) = got.last() {
                next = last.offset + 1;
            }
        }
        Ok::<_, Error>(Instant::now())
    });
    let payload = Bytes::from(vec![b'x'; 100]);
    let mut sent = 0;
    while sent < args.records {
        let n = args.batch.min(args.records - sent);
        let batch = (0..n).map(|_| RpcRecord::new(Some("key"), payload.clone())).collect();
        t.produce(&topic, 0, batch).await?;
        sent += n;
    }
    let produced = started.elapsed();
    let produced_at = Instant::now();
    let done = read.await??.max(produced_at);
    let elapsed = done - started;
    Ok(Throughput { end_to_end: args.records as f64 / elapsed.as_secs_f64(), produce: args.records as f64 / produced.as_secs_f64(), elapsed })
}

async fn transport_latency(args: &Args) -> Result<Histogram<u64>, Error> {
    let t = transport(args).await?;
    let topic = format!("ceiling-latency-{}", uuid::Uuid::new_v4().simple());
    t.ensure_topic(&topic, 1).await?;
    let mut reader = t.reader(&topic, 0).await?;
    let mut hist = Histogram::<u64>::new(3)?;
    let payload = Bytes::from(vec![b'x'; 100]);
    let mut next = 0i64;
    for _ in 0..args.samples {
        let started = Instant::now();
        t.produce(&topic, 0, vec![RpcRecord::new(Some("key"), payload.clone())]).await?;
        loop {
            let got = reader.fetch(next, Duration::from_millis(100)).await?;
            if let Some(last) = got.last() {
                next = last.offset + 1;
                break;
            }
        }
        hist.record(started.elapsed().as_micros() as u64)?;
    }
    Ok(hist)
}

fn report(label: &str, args: &Args, tput: &Throughput, hist: &Histogram<u64>) {
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{label}: throughput {} records of 100 B in batches of {}, one produce request at a time: produce -> fetched {:.0} records/s ({:.2} s); the producer alone finished at {:.0} records/s",
        args.records,
        args.batch,
        tput.end_to_end,
        tput.elapsed.as_secs_f64(),
        tput.produce,
    );
    println!(
        "{label}: latency one record at a time, produce -> fetched, fetch max-wait {} ms, {} samples: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.wait_ms,
        args.samples,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("broker_ceiling: {e}\nusage: broker_ceiling --bootstrap HOST:PORT [--records N] [--batch N] [--samples N] [--wait-ms N] [--client both|rskafka|transport] [--no-reader]");
            std::process::exit(2);
        }
    };
    if args.client == "both" || args.client == "rskafka" {
        let tput = throughput(&args).await?;
        let hist = latency(&args).await?;
        report("rskafka", &args, &tput, &hist);
        let (one_way, rt) = round_trip(&args).await?;
        let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / 1000.0;
        println!(
            "rskafka: request-reply through a responder, readers already waiting, fetch max-wait {} ms, {} samples: round trip p50 {:.2} ms, p99 {:.2} ms; one-way p50 {:.2} ms; round trip / one-way = {:.2}",
            args.wait_ms,
            args.samples,
            p50(&rt),
            rt.value_at_quantile(0.99) as f64 / 1000.0,
            p50(&one_way),
            p50(&rt) / p50(&one_way).max(0.001)
        );
    }
    if args.client == "both" || args.client == "transport" {
        let tput = transport_throughput(&args).await?;
        let hist = transport_latency(&args).await?;
        report("KafkaTransport", &args, &tput, &hist);
    }
    Ok(())
}
