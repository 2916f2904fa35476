//! `marsad`: the command line of the Marsad pipeline. It parses flags, sets
//! up logging and dispatches to the stages' libraries.

mod cli;
mod jobs;
mod simulate;
mod stages;
mod tools;

use clap::Parser;

/// The processor allocates and frees small values for every event (glibc's allocator took
/// about 15 % of its samples), and its compactions free hundreds of MiB at a time on whatever
/// threads ran them: jemalloc's background threads give those pages back to the system where
/// mimalloc kept them resident (BENCHMARKS.md, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use crate::cli::{Cli, Command, KeysCommand, ReportCommand, SegmentsCommand, TopicsCommand};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli::init_tracing(cli.log_format, cli.verbose);
    // 8 MiB per worker, as a main thread has: planning a deeply nested statement recurses, and
    // the analyst SQL fuzzer ran on such a stack without overflowing (tokio's default is 2 MiB)
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_stack_size(8 << 20)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => stages::up(args).await,
            Command::Ingest(args) => stages::ingest(args).await,
            Command::Process(args) => stages::process(args).await,
            Command::Query(args) => stages::query(args).await,
            Command::Simulate(args) => simulate::run(args).await.map(|_| ()),
            Command::Audit(args) => tools::audit(args).await,
            Command::Erase(args) => tools::erase(args).await,
            Command::OptOut(args) => tools::opt_out(args).await,
            Command::Sql(args) => jobs::sql(args).await,
            Command::Compact(args) => jobs::compact(args).await,
            Command::Retention(args) => jobs::retention(args).await,
            Command::Backfill(args) => jobs::backfill(args).await,
            Command::Segments(SegmentsCommand::Refresh(args)) => tools::refresh_segments(args).await,
            Command::Topics(TopicsCommand::Create(args)) => tools::create_topics(args).await,
            Command::Keys(KeysCommand::AdoptTargeting(args)) => stages::adopt_targeting_key(args).await,
            Command::Report(ReportCommand::Send(args)) => stages::send_reports(args).await,
        }
    })
}
