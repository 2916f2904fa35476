#!/usr/bin/env bash
# Peak memory (resident set, from /usr/bin/time -v) of the paths whose memory must not grow
# with the data: the processor draining a big raw log (with every event remembered by the
# duplicate filter), a backfill of that day, and exports through `marsad sql`.
#
#   benches/memory.sh            # MEMORY_EVENTS (default 2,000,000) events, MEMORY_EXPORT_ROWS (50,000,000)
#
# Builds the release binary first (cargo build --release), or uses MEMORY_BIN (e.g. the one
# `cargo bench` built, target/release/marsad). Prints one line per path. The processor runs on
# MEMORY_SETTLE_SECS (90) after the drain, for the compactions of what it wrote.
# MEMORY_BASELINE_BIN (another build, e.g. of the commit before) drains a copy of the same raw
# log first, so that the two processors' peaks come from one run and one input.
set -euo pipefail
cd "$(dirname "$0")/.."

events=${MEMORY_EVENTS:-2000000}
export_rows=${MEMORY_EXPORT_ROWS:-50000000}
if [ -z "${MEMORY_BIN:-}" ]; then
  cargo build --release --quiet
fi
bin=${MEMORY_BIN:-$PWD/target/release/marsad}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
data=$dir/data
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
peak() { awk -F': ' '/Maximum resident set size/ {printf "%.0f MiB", $2/1024}' "$1"; }
wall() { awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$1"; }
export RUST_LOG=warn
# the processor remembers every event of the run (its duplicate filter is sized for them)
export MARSAD_PROCESS__DEDUP_CAPACITY=$events
export MARSAD_PROCESS__METRICS_ADDR=127.0.0.1:$(free_port)
# the simulator sends everything from one address: the per-address limit would refuse most of it
export MARSAD_INGEST__LIMITS__RATE_PER_SECOND=0

# 1. the raw log: ingest alone, fed by the simulator (realistic traffic, 200k visitors)
port=$(free_port)
"$bin" ingest --data-dir "$data" --ingest-addr "127.0.0.1:$port" >"$dir/ingest.log" 2>&1 &
ingest=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "ingest did not start:"; cat "$dir/ingest.log"; exit 1; }
rate=40000
"$bin" simulate --url "http://127.0.0.1:$port" --rate $rate --duration $(( events / rate )) \
  --visitors 200000 --seed 7 >"$dir/simulate.log" 2>&1
kill -TERM $ingest; wait $ingest || true
sent=$( { grep -o '[0-9]* acknowledged' "$dir/simulate.log" || true; } | tail -1 | cut -d' ' -f1)
refused=$( { grep -o '[0-9]* rejected, [0-9]* failed' "$dir/simulate.log" || true; } | tail -1 | awk '{print $1 + $3}')
# a run whose events were refused must not pass for a result (more than 1 % of those sent)
if [ -z "$sent" ] || [ -z "$refused" ] || [ "$refused" -gt $(( (sent + refused) / 100 )) ]; then
  echo "${refused:-?} events refused or failed, ${sent:-?} acknowledged: not a measurement" >&2
  cat "$dir/simulate.log" >&2
  exit 1
fi
echo "raw log: $sent events acknowledged by ingest ($(tail -1 "$dir/simulate.log"))"

# 2. the processor drains it, runs its compactions over what it wrote, then is stopped
# (`drain BIN DATA LABEL`: one line; the baseline first, on a copy of the same raw log)
drain() {
  local bin=$1 data=$2 label=$3
  RUST_LOG=warn,marsad::stages=info /usr/bin/time -v "$bin" process --data-dir "$data" >"$dir/process.log" 2>"$dir/process.time" &
  local process=$!
  local started; started=$(date +%s)
  count() { "$bin" sql --data-dir "$data" --format csv -e "$1" 2>/dev/null | sed -n 2p; }
  rss() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$(pgrep -P $process | head -1)/status" 2>/dev/null || echo 0; }
  # drained when the count stops moving (a few events may be opted out or dead-lettered)
  local last=-1 peak_drain=0 now
  stored=0  # (global: the export line below names the main run's count)
  while [ "$stored" != "$last" ] || [ "$stored" = 0 ]; do
    # a processor that died (an older baseline build refusing today's settings, say) is
    # not a measurement: its log, and the end of the script
    kill -0 "$process" 2>/dev/null || { echo "$label: the processor ended early:" >&2; cat "$dir/process.time" >&2; exit 1; }
    last=$stored; sleep 5; stored=$(count 'SELECT count(*) FROM events' || echo 0)
    now=$(rss); now=${now:-0}
    if [ "$now" -gt "$peak_drain" ]; then peak_drain=$now; fi
  done
  local drained=$(( $(date +%s) - started ))
  # the compactions of the rollups and of `events` (one after the other, every
  # process.rollup_compaction_interval_secs, 20 s) over the drained day run after the drain:
  # they count in the processor's memory as much as the drain does
  local settle=${MEMORY_SETTLE_SECS:-90}
  sleep "$settle"
  pkill -TERM -P $process || true; wait $process || true
  local compactions; compactions=$(grep -c 'files compacted\|rollups compacted' "$dir/process.time" || true)
  local cpu; cpu=$(awk -F': ' '/User time|System time/ {s += $2} END {printf "%.1f", s}' "$dir/process.time")
  echo "$label: $stored events stored, each remembered for duplicates: peak $(peak "$dir/process.time") (${peak_drain} MiB sampled while draining, ${drained} s; then ${settle} s more, ${compactions} compactions), wall $(wall "$dir/process.time"), cpu ${cpu} s"
}
if [ -n "${MEMORY_BASELINE_BIN:-}" ]; then
  cp -a "$data" "$dir/baseline-data"
  drain "$MEMORY_BASELINE_BIN" "$dir/baseline-data" "process, baseline $(basename "$MEMORY_BASELINE_BIN")"
  rm -rf "$dir/baseline-data"
fi
drain "$bin" "$data" process

# 3. a backfill of today (the whole raw log is read; memory is a chunk, not the log)
today=$(date -u +%F)
/usr/bin/time -v "$bin" backfill --data-dir "$data" --from "$today" >"$dir/backfill.log" 2>"$dir/backfill.time"
echo "backfill: $(grep -o '[0-9]* events rebuilt' "$dir/backfill.log"): peak $(peak "$dir/backfill.time"), wall $(wall "$dir/backfill.time")"

# 4. exports through marsad sql: every stored event, and a generated result of $export_rows rows
/usr/bin/time -v "$bin" sql --data-dir "$data" --format parquet -o "$dir/events.parquet" \
  -e 'SELECT * FROM events' >/dev/null 2>"$dir/export.time"
echo "sql export of events ($stored rows, parquet, $(du -h "$dir/events.parquet" | cut -f1)): peak $(peak "$dir/export.time"), wall $(wall "$dir/export.time")"
/usr/bin/time -v "$bin" sql --data-dir "$data" --format csv -o /dev/null \
  -e "SELECT value, value * 2 AS twice, 'row ' || value AS label FROM generate_series(1, $export_rows)" \
  >/dev/null 2>"$dir/generated.time"
echo "sql export of $export_rows generated rows (csv): peak $(peak "$dir/generated.time"), wall $(wall "$dir/generated.time")"
