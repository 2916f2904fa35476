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
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
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
# "REQ/S P99_MS" of one wrk run; a run with a failed request (a 4xx/5xx answer, a socket
# error or a timeout: wrk counts them in its rate) or no answer at all is not a measurement
measure() {
  local out
  out=$(wrk -t2 -c32 -d"${seconds}s" --latency "$@") || { echo "wrk failed: $out" >&2; return 1; }
  if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then
    echo "failed requests, not a measurement:" >&2; echo "$out" >&2; return 1
  fi
  awk '/Requests\/sec/ {r=$2}
       / 99%/ {l=$2; u=l; gsub(/[0-9.]/, "", u); sub(/[a-z]+$/, "", l);
               l = (u == "us") ? l / 1000 : (u == "s") ? l * 1000 : l}
       END {if (r + 0 <= 0) exit 1; printf "%s %.2f\n", r, l}' <<<"$out"
}
echo "single events by wrk (32 connections, ${seconds}s each; one fresh server and log per line):"
for bin in "$@"; do
  data=$(mktemp -d "$work/data-XXXX"); port=$(free_port)
  MARSAD_INGEST__LIMITS__RATE_PER_SECOND=0 RUST_LOG=warn "$bin" ingest --data-dir "$data" \
    --ingest-addr "127.0.0.1:$port" >"$work/ingest.out" 2>&1 &
  server=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "ingest did not start:" >&2; cat "$work/ingest.out" >&2; exit 1; }
  health=$(measure "http://127.0.0.1:$port/healthz")
  events=$(measure -s "$work/post.lua" "http://127.0.0.1:$port/v1/events")
  kill "$server" 2>/dev/null || { echo "ingest ended during the run:" >&2; cat "$work/ingest.out" >&2; exit 1; }
  wait "$server" 2>/dev/null || true
  read -r health_rate health_p99 <<<"$health"
  read -r events_rate events_p99 <<<"$events"
  awk -v b="$(basename "$bin")" -v hr="$health_rate" -v hl="$health_p99" -v er="$events_rate" -v el="$events_p99" \
    'BEGIN {printf "  %-24s GET /healthz %9.0f req/s p99 %5.2f ms   POST /v1/events %8.0f req/s p99 %5.2f ms   ratio %.2f\n", b, hr, hl, er, el, er / hr}'
done
