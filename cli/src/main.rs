//! `kafka-rpc`: call a kafka-rpc, Spring Kafka or NestJS service from a shell, read the
//! request-reply headers of a topic, and measure round trips.
//!
//! ```text
//! kafka-rpc call --bootstrap 127.0.0.1:9092 --topic math --type math.add --json '{"a":2,"b":3}'
//! kafka-rpc inspect --bootstrap 127.0.0.1:9092 --topic math.replies --from-beginning
//! kafka-rpc bench --embedded
//! ```
//!
//! Every failure is one line on stderr and an exit code that says what kind it was
//! ([`Failure::exit_code`]), so scripts can branch on the outcome of a call.

mod bench;
mod broker;
mod call;
mod duration;
mod failure;
mod inspect;
mod render;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use failure::Failure;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the service answered with an error (its code and message are printed)
  2  bad usage or input (arguments, JSON)
  3  no reply within --timeout
  4  the broker cannot be reached
  5  the topic does not exist
  6  any other failure";

/// Call, inspect and benchmark request-reply services over Kafka.
#[derive(Parser, Debug)]
#[command(name = "kafka-rpc", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send one JSON request and print the reply (or the service's error).
    Call(call::Args),
    /// Print a topic's records with their request-reply headers decoded.
    Inspect(inspect::Args),
    /// Measure round trips against a broker (or the embedded one) with a server of its own.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    // A bug must still end as one line, not a backtrace in the user's terminal.
    std::panic::set_hook(Box::new(|info| eprintln!("kafka-rpc: internal error: {}", failure::one_line(&info.to_string()))));
    // Help and version exit 0; usage errors exit 2, as the table says.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report(Failure::Other(format!("cannot start the async runtime: {e}"))),
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Call(args) => call::run(args).await,
            Command::Inspect(args) => inspect::run(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    // Background connection tasks are not worth waiting for once the answer is out.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(failure),
    }
}

fn report(failure: Failure) -> ExitCode {
    eprintln!("kafka-rpc: {failure}");
    ExitCode::from(failure.exit_code())
}
