//! `kafka-rpc inspect`: a topic's records with their request-reply headers decoded.
//!
//! Without `--from-beginning` it starts at the end and waits for new records, as
//! Kafka's console consumer does; with it, it prints what the topic holds and stops at
//! the end, unless `--follow` keeps it waiting for more.

use std::time::Duration;

use kafka_rpc::__private::Backoff;
use kafka_rpc::transport::{ConsumedRecord, Transport, TransportError};
use tokio::sync::mpsc;

use crate::broker::{self, BrokerArgs};
use crate::failure::Failure;

/// How long one fetch waits for new records before asking again.
const POLL: Duration = Duration::from_millis(500);

/// Pauses before reading an offset the broker said was out of range, though inside the
/// log, again: as the library's partition tails pause.
const RETRY: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));

/// Arguments of `kafka-rpc inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Topic to read. It must exist.
    #[arg(long)]
    topic: String,
    /// Start at the oldest retained record (and stop at the end unless --follow).
    #[arg(long)]
    from_beginning: bool,
    /// Keep waiting for new records after the end (always so without --from-beginning).
    #[arg(long)]
    follow: bool,
    /// Read only this partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Stop after printing this many records.
    #[arg(long, value_name = "N")]
    max_records: Option<u64>,
}

/// Where one partition's reading starts and stops.
struct Range {
    start: i64,
    /// The end offset when not following.
    end: Option<i64>,
}

/// Reads the partitions concurrently and prints each record as it arrives, in offset
/// order within its partition.
pub async fn run(args: Args) -> Result<(), Failure> {
    let transport = args.broker.connect().await?;
    let count = broker::existing_topic(&transport, &args.topic).await?;
    let partitions: Vec<i32> = match args.partition {
        Some(p) if !(0..count).contains(&p) => {
            return Err(Failure::Usage(format!("topic `{}` has partitions 0..{count}, not {p}", args.topic)))
        }
        Some(p) => vec![p],
        None => (0..count).collect(),
    };
    let follow = args.follow || !args.from_beginning;

    let (tx, mut rx) = mpsc::channel::<Result<ConsumedRecord, TransportError>>(256);
    for partition in partitions {
        let latest = transport.latest_offset(&args.topic, partition).await?;
        let range = Range {
            // Offset 0 may be gone to retention; the first fetch then says where the log starts.
            start: if args.from_beginning { 0 } else { latest },
            end: (!follow).then_some(latest),
        };
        let reader = transport.reader(&args.topic, partition).await?;
        tokio::spawn(read(reader, range, tx.clone()));
    }
    drop(tx);

    let mut printed = 0u64;
    while args.max_records.is_none_or(|max| printed < max) {
        let Some(next) = rx.recv().await else { break };
        if !crate::failure::write_stdout(&crate::render::record(&args.topic, &next?, now_ms()))? {
            // The reader went away (`| head`): it has seen all it wanted.
            break;
        }
        printed += 1;
    }
    Ok(())
}

/// Sends one partition's records from `range.start` until `range.end` (for ever when
/// there is none), or the first error.
async fn read(
    mut reader: Box<dyn kafka_rpc::transport::PartitionReader>,
    range: Range,
    tx: mpsc::Sender<Result<ConsumedRecord, TransportError>>,
) {
    let mut offset = range.start;
    let mut retry = RETRY;
    while range.end.is_none_or(|end| offset < end) {
        match reader.read(offset, POLL).await {
            Ok(fetch) => {
                retry.reset();
                for record in fetch.records {
                    if range.end.is_some_and(|end| record.offset >= end) {
                        return;
                    }
                    if tx.send(Ok(record)).await.is_err() {
                        return;
                    }
                }
                // Past what the reader passed over too (transaction markers, batches
                // it cannot decode): a log that ends in them has still been read to
                // its end. One past the last record was never reached there.
                offset = offset.max(fetch.next_offset);
            }
            // Retention moved the log start past `offset` (or the broker lost data):
            // carry on from where the log is. Apache Kafka's answer names no ends, and
            // the ends looked up after it may hold `offset` again (the log grew, a new
            // leader caught up): then `offset` is read again, not jumped past.
            Err(TransportError::OffsetOutOfRange { earliest, latest, .. }) => {
                if offset < earliest {
                    offset = earliest;
                } else if offset > latest {
                    offset = latest;
                } else {
                    // The broker may answer so until it catches up: asking again at once
                    // would cost a fetch and an end look-up every round trip meanwhile.
                    tokio::time::sleep(retry.next_pause()).await;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch, the unit of Kafka timestamps and of
/// the deadline header.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
