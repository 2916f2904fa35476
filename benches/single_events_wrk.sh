#!/usr/bin/env bash
# Single-event ingest measured by wrk (a C client, lighter than the load harness's reqwest):
# for each binary given, `marsad ingest` on a fresh local log, then 32 connections for
# WRK_SECONDS (10) on GET /healthz and then on POST /v1/events (one event per request, each
# answered 202 only once durable), printing requests/s, p99 and the ratio of the two. Two
# binaries in one call are measured in turn on the same machine, in the order given.
#
#   benches/single_events_wrk.sh target/release/marsad [another build ...]
#
# Needs wrk (Debian's package `wrk`).
set -euo pipefail
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
[ $# -ge 1 ] || { echo "usage: $0 MARSAD_BIN [MARSAD_BIN ...]" >&2; exit 2; }
seconds=${WRK_SECONDS:-10}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Forwarded-For"] = "176.29.10.1"
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"type":"page_view","url":"https://kulshi.example/ar/cars/toyota?id=%d",'
    .. '"referrer":"https://www.google.com/","cookie_id":"c-%d",'
    .. '"consent":{"analytics":true,"personalisation":true,"marketing":false}}', n, n % 5000)
  return wrk.format(nil, "/v1/events", nil, body)
end
LUA
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# "REQ/S P99 NON2XX" of one wrk run (non-2xx answers counted, never taken for throughput)
measure() {
  wrk -t2 -c32 -d"${seconds}s" --latency "$@" |
    awk '/Requests\/sec/ {r=$2} / 99%/ {l=$2} /Non-2xx/ {n=$NF} END {print r, l, (n == "" ? 0 : n)}'
}
echo "single events by wrk (32 connections, ${seconds}s each, the same server for both lines):"
for bin in "$@"; do
  data=$work/data-$RANDOM; port=$(free_port)
  MARSAD_INGEST__LIMITS__RATE_PER_SECOND=0 RUST_LOG=warn "$bin" ingest --data-dir "$data" \
    --ingest-addr "127.0.0.1:$port" >"$work/ingest.out" 2>&1 &
  server=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "ingest did not start:" >&2; cat "$work/ingest.out" >&2; exit 1; }
  read -r health_rate health_p99 _ < <(measure "http://127.0.0.1:$port/healthz")
  read -r events_rate events_p99 refused < <(measure -s "$work/post.lua" "http://127.0.0.1:$port/v1/events")
  kill "$server"; wait "$server" 2>/dev/null || true
  awk -v b="$(basename "$bin")" -v hr="$health_rate" -v hl="$health_p99" -v er="$events_rate" -v el="$events_p99" -v n="$refused" \
    'BEGIN {printf "  %-24s GET /healthz %9.0f req/s p99 %-7s POST /v1/events %8.0f req/s p99 %-7s ratio %.2f, %d not 2xx\n", b, hr, hl, er, el, er / hr, n}'
done
