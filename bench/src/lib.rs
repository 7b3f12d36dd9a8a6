//! lock-vs-rpc: does request-reply keyed by store beat locking, and does it keep the
//! order of updates?
//!
//! Every contender applies the same delivery-radius update to the same PostgreSQL
//! table (see [`db`]): a Redis lock, a PostgreSQL row lock, and kafka-rpc (one request
//! per transaction, and batched with a batch handler) on the
//! embedded broker and on tansu, with pgbench running the same hot-row transaction as
//! the anchor. [`sweep::sweep`] runs them all at several contention levels on the same
//! servers, [`report`] writes the CSV, table and plots. The binary starts throwaway
//! PostgreSQL, Redis and tansu servers and runs the default sweep; see
//! docs/benchmarks.md.

pub mod audit;
pub mod broker;
pub mod contender;
pub mod db;
pub mod report;
pub mod run;
pub mod sweep;
pub mod workload;
