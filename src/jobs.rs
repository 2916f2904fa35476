//! Batch jobs for data engineers: `marsad sql`, `marsad compact`,
//! `marsad retention`, `marsad backfill`. Each shows progress on stderr and ends
//! with a summary line.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use futures::StreamExt;

use crate::cli::StageArgs;

/// How `marsad sql` writes rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header line.
    Csv,
    /// One JSON object per line.
    Ndjson,
    /// A Parquet file (needs `--output`).
    Parquet,
}

/// `marsad sql` flags.
#[derive(Debug, Clone, Args)]
pub struct SqlArgs {
    /// Data dir and config (local mode).
    #[command(flatten)]
    pub stage: StageArgs,
    /// The statement to run.
    #[arg(
        short = 'e',
        long = "execute",
        conflicts_with = "file",
        required_unless_present = "file"
    )]
    pub execute: Option<String>,
    /// A file holding the statement.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Write here instead of stdout.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Ask a running query service instead of reading the data dir (engineer key needed).
    #[arg(long)]
    pub url: Option<String>,
    /// File with the API key for `--url` [default: <data-dir>/admin.key].
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

fn spinner(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn sink(output: &Option<PathBuf>) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    })
}

/// Runs one read-only statement on the data dir (or a query service) and writes the rows.
pub async fn sql(args: SqlArgs) -> anyhow::Result<()> {
    let statement = match (&args.execute, &args.file) {
        (Some(s), _) => s.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => bail!("give the statement with -e SQL or -f FILE"),
    };
    if args.format == OutputFormat::Parquet && args.output.is_none() {
        bail!("parquet output needs --output FILE");
    }
    let started = Instant::now();
    let bar = spinner("running the query…");
    if let Some(url) = &args.url {
        let result = remote_sql(&args, url, &statement).await;
        bar.finish_and_clear();
        let bytes = result?;
        sink(&args.output)?.write_all(&bytes)?;
        eprintln!(
            "{} bytes from {url} in {:.1} s",
            bytes.len(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let config = args.stage.config()?;
    let catalog = marsad_query::TableCatalog::new(config.tables()?);
    let ctx = catalog.session().await?;
    let mut rows = marsad_query::sql::stream(&ctx, &statement)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let schema = rows.schema();
    let mut out = RowWriter::new(args.format, sink(&args.output)?, schema.clone())?;
    let (mut count, mut shown) = (0usize, 0usize);
    while let Some(batch) = rows.next().await {
        let batch = batch.map_err(|e| anyhow::anyhow!("{}", marsad_query::sql::user_error(e)))?;
        count += batch.num_rows();
        shown += out.write(&batch)?;
        bar.set_message(format!("{count} rows…"));
    }
    bar.finish_and_clear();
    out.finish()?;
    if shown < count {
        eprintln!("showing the first {shown} of {count} rows; --format csv, ndjson or parquet writes them all");
    }
    eprintln!(
        "{count} rows, {} columns in {:.1} s{}{}",
        schema.fields().len(),
        started.elapsed().as_secs_f64(),
        args.output
            .as_ref()
            .map(|p| format!(" → {}", p.display()))
            .unwrap_or_default(),
        peak_memory()
            .map(|m| format!(", peak memory {m} MiB"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Rows shown by `--format table`: a table is for reading, exports stream every row.
const TABLE_ROWS: usize = 1_000;

/// Writes a query's batches as they arrive, in one of the output formats: memory holds a batch,
/// never the result.
enum RowWriter {
    Table {
        out: Box<dyn Write + Send>,
        kept: Vec<arrow::record_batch::RecordBatch>,
        rows: usize,
    },
    Csv(arrow::csv::Writer<Box<dyn Write + Send>>),
    Ndjson(arrow::json::LineDelimitedWriter<Box<dyn Write + Send>>),
    Parquet(parquet::arrow::ArrowWriter<Box<dyn Write + Send>>),
}

impl RowWriter {
    fn new(
        format: OutputFormat,
        out: Box<dyn Write + Send>,
        schema: arrow::datatypes::SchemaRef,
    ) -> anyhow::Result<Self> {
        Ok(match format {
            OutputFormat::Table => RowWriter::Table {
                out,
                kept: Vec::new(),
                rows: 0,
            },
            OutputFormat::Csv => {
                let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(out);
                // the header line, also when no row comes
                w.write(&arrow::record_batch::RecordBatch::new_empty(schema))?;
                RowWriter::Csv(w)
            }
            OutputFormat::Ndjson => RowWriter::Ndjson(arrow::json::LineDelimitedWriter::new(out)),
            OutputFormat::Parquet => {
                let properties = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
                    .build();
                RowWriter::Parquet(parquet::arrow::ArrowWriter::try_new(out, schema, Some(properties))?)
            }
        })
    }

    /// Writes `batch`; returns how many of its rows were written (a table shows the first rows only).
    fn write(&mut self, batch: &arrow::record_batch::RecordBatch) -> anyhow::Result<usize> {
        match self {
            RowWriter::Table { kept, rows, .. } => {
                let take = batch.num_rows().min(TABLE_ROWS - *rows);
                if take > 0 {
                    kept.push(batch.slice(0, take));
                    *rows += take;
                }
                Ok(take)
            }
            RowWriter::Csv(w) => {
                // the same defusing as the HTTP export: these files open in spreadsheets too
                let defused = marsad_query::sql::defuse_formulas(batch)
                    .map_err(|e| anyhow::anyhow!("cannot render the result as CSV: {e}"))?;
                w.write(&defused)?;
                Ok(batch.num_rows())
            }
            RowWriter::Ndjson(w) => {
                w.write(batch)?;
                Ok(batch.num_rows())
            }
            RowWriter::Parquet(w) => {
                w.write(batch)?;
                Ok(batch.num_rows())
            }
        }
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            RowWriter::Table { mut out, kept, .. } => {
                writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(&kept)?)?;
                out.flush()?;
            }
            RowWriter::Csv(w) => w.into_inner().flush()?,
            RowWriter::Ndjson(mut w) => {
                w.finish()?;
                w.into_inner().flush()?;
            }
            RowWriter::Parquet(w) => {
                w.close()?;
            }
        }
        Ok(())
    }
}

/// This process's peak resident memory in MiB (Linux), for the summary of long jobs.
pub fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024)
}

async fn remote_sql(args: &SqlArgs, url: &str, statement: &str) -> anyhow::Result<Vec<u8>> {
    let format = match args.format {
        OutputFormat::Csv => "csv",
        OutputFormat::Ndjson => "ndjson",
        OutputFormat::Table => "json",
        OutputFormat::Parquet => bail!("parquet output is written from the data dir only (drop --url)"),
    };
    let key_file = args.key_file.clone().unwrap_or_else(|| {
        args.stage
            .data_dir
            .clone()
            .unwrap_or_else(|| "./marsad-data".into())
            .join("admin.key")
    });
    let key =
        std::fs::read_to_string(&key_file).with_context(|| format!("reading the key from {}", key_file.display()))?;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/sql?format={format}", url.trim_end_matches('/')))
        .bearer_auth(key.trim())
        .json(&serde_json::json!({ "sql": statement }))
        .send()
        .await
        .with_context(|| format!("calling {url}"))?;
    let status = resp.status();
    let bytes = resp.bytes().await?.to_vec();
    if !status.is_success() {
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        bail!(
            "query refused ({status}): {}",
            body["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(bytes)
}

/// `marsad compact` flags.
#[derive(Debug, Clone, Args)]
pub struct CompactArgs {
    /// Data dir and config.
    #[command(flatten)]
    pub stage: StageArgs,
    /// Target size of the rewritten files, in MiB.
    #[arg(long, default_value_t = 128)]
    pub target_file_mb: u64,
}

/// Merges rollup rows per key, then rewrites small files of every table into large ones.
pub async fn compact(args: CompactArgs) -> anyhow::Result<()> {
    let config = args.stage.config()?;
    let started = Instant::now();
    let bar = spinner("merging partial rollup rows…");
    let merged = marsad_process::rollup::compact(&config.tables()?, 2).await?;
    let before: usize = merged.iter().map(|m| m.rows_before).sum();
    let after: usize = merged.iter().map(|m| m.rows_after).sum();
    let files = marsad_process::maintenance::compact_files(&config.tables()?, args.target_file_mb << 20, |t| {
        bar.set_message(format!("rewriting small files of {t}…"))
    })
    .await?;
    bar.finish_and_clear();
    for f in &files {
        println!(
            "{:<24} {} files rewritten into {} ({} partitions)",
            f.table, f.files_removed, f.files_added, f.partitions
        );
    }
    println!(
        "compacted: rollup rows {before} → {after} over {} dates; {} files → {} in {:.1} s",
        merged.len(),
        files.iter().map(|f| f.files_removed).sum::<u64>(),
        files.iter().map(|f| f.files_added).sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `marsad retention` flags.
#[derive(Debug, Clone, Args)]
pub struct RetentionArgs {
    /// Data dir and config.
    #[command(flatten)]
    pub stage: StageArgs,
    /// Keep this many days (today included); older dates are deleted from every table.
    #[arg(long)]
    pub keep_days: u32,
}

/// Deletes old dates from every table and removes their files from storage.
pub async fn retention(args: RetentionArgs) -> anyhow::Result<()> {
    if args.keep_days == 0 {
        bail!("--keep-days must be at least 1 (today)");
    }
    let config = args.stage.config()?;
    let cutoff = chrono::Utc::now()
        .date_naive()
        .checked_sub_days(chrono::Days::new(u64::from(args.keep_days) - 1))
        .with_context(|| format!("--keep-days {} reaches before the calendar's first day", args.keep_days))?;
    let started = Instant::now();
    let bar = spinner("deleting old dates…");
    let done = marsad_process::maintenance::apply_retention(&config.tables()?, cutoff, |t| {
        bar.set_message(format!("deleting dates before {cutoff} from {t}…"))
    })
    .await?;
    bar.finish_and_clear();
    for r in &done {
        println!(
            "{:<24} {} rows deleted, {} files removed",
            r.table, r.rows_deleted, r.files_vacuumed
        );
    }
    println!(
        "retention: kept {cutoff} and later; {} rows deleted from {} tables in {:.1} s",
        done.iter().map(|r| r.rows_deleted).sum::<usize>(),
        done.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `marsad backfill` flags.
#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    /// Data dir and config: the rules the rows are rebuilt with.
    #[command(flatten)]
    pub stage: StageArgs,
    /// First date to rebuild (YYYY-MM-DD, UTC).
    #[arg(long)]
    pub from: chrono::NaiveDate,
    /// Last date to rebuild, inclusive [default: --from].
    #[arg(long)]
    pub to: Option<chrono::NaiveDate>,
}

/// Re-runs the processor over the retained raw log and swaps the rebuilt rows of the dates in.
pub async fn backfill(args: BackfillArgs) -> anyhow::Result<()> {
    use marsad_process::backfill::{DateRange, Progress};
    let config = args.stage.config()?;
    let range = DateRange {
        from: args.from,
        to: args.to.unwrap_or(args.from),
    };
    let started = Instant::now();
    let log = crate::stages::open_log(&config, "backfill")?.log;
    let opt_outs = crate::tools::opt_outs_recorded(log.as_ref()).await?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("raw-log records");
    let report = marsad_process::backfill::backfill(&config, log.as_ref(), opt_outs, range, |p| match p {
        Progress::Reading { read, total } => {
            bar.set_length(total);
            bar.set_position(read);
        }
        Progress::Writing { table } => bar.set_message(format!("records read; rewriting {table}…")),
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    for t in &report.tables {
        println!(
            "{:<24} {} rows written; events counted {} → {}",
            t.table, t.rows_written, t.events_before, t.events_after
        );
    }
    println!(
        "backfilled {}..{}: {} raw records read, {} events rebuilt ({} not collected, {} duplicates, {} \
         unprocessable) in {:.1} s, at most {} events in memory at once{}; segments take the rebuilt rows \
         at their next refresh",
        report.from,
        report.to,
        report.records_read,
        report.events_rebuilt,
        report.not_collected,
        report.duplicates,
        report.unprocessable,
        started.elapsed().as_secs_f64(),
        report.max_rows_held,
        peak_memory()
            .map(|m| format!(" (peak memory {m} MiB)"))
            .unwrap_or_default()
    );
    Ok(())
}
