#!/usr/bin/env python3
"""Dashboard-style SQL over Marsad's `events`, side by side with the engines a user would
pick instead, on the same Parquet files: the active files of the Delta table, linked into one
directory so every engine reads exactly what Marsad reads.

Run by `cargo bench --bench engines` (which makes the data and starts Marsad); alone:
    python3 benches/engines.py --table DATA/tables/events --url http://127.0.0.1:8081 \
        --key ENGINEER_KEY [--pg-port 5433] [--label "as written"]

Every engine must return the same rows for every query (compared as sorted rows, numbers to
6 significant digits) before any is timed; then each query runs once to warm up and RUNS
times, and the median counts. Figures are ratios against DuckDB and DataFusion measured in
the same run.
"""
import argparse
import atexit
import http.client
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse

RUNS = int(os.environ.get("ENGINES_RUNS", "5"))

# A dashboard's questions: counts, distinct visitors, CASE sums, LIKE, top-N, a subquery.
QUERIES = [
    ("select_1", "SELECT 1 AS one"),
    ("by_country", "SELECT country, count(*) AS n FROM events GROUP BY country ORDER BY n DESC, country"),
    (
        "country_device_visitors",
        "SELECT country, device_type, count(DISTINCT visitor_key) AS visitors, count(*) AS n "
        "FROM events GROUP BY country, device_type ORDER BY n DESC, country, device_type",
    ),
    (
        "campaigns",
        "SELECT campaign_id, sum(CASE WHEN event_type = 'ad_impression' THEN 1 ELSE 0 END) AS impressions, "
        "sum(CASE WHEN event_type = 'ad_click' THEN 1 ELSE 0 END) AS clicks "
        "FROM events WHERE campaign_id IS NOT NULL GROUP BY campaign_id ORDER BY campaign_id",
    ),
    (
        "top_pages",
        "SELECT page_path, count(*) AS n FROM events WHERE event_type = 'page_view' AND page_path IS NOT NULL "
        "GROUP BY page_path ORDER BY n DESC, page_path LIMIT 20",
    ),
    (
        "hourly_sessions",
        "SELECT EXTRACT(HOUR FROM ts) AS h, count(DISTINCT session_id) AS sessions "
        "FROM events GROUP BY EXTRACT(HOUR FROM ts) ORDER BY h",
    ),
    (
        "referrers",
        "SELECT referrer_domain, count(*) AS n FROM events WHERE referrer_domain IS NOT NULL "
        "GROUP BY referrer_domain ORDER BY n DESC, referrer_domain LIMIT 20",
    ),
    ("distinct_visitors", "SELECT count(DISTINCT visitor_key) AS visitors FROM events"),
    (
        "demographics",
        "SELECT age_band, gender, count(*) AS n FROM events WHERE age_band IS NOT NULL "
        "GROUP BY age_band, gender ORDER BY age_band, gender",
    ),
    ("os_browser", "SELECT os, browser, count(*) AS n FROM events GROUP BY os, browser ORDER BY n DESC, os, browser"),
    ("path_like", "SELECT count(*) AS n FROM events WHERE page_path LIKE '%/cars%'"),
    (
        "pages_per_session",
        "SELECT avg(pages) AS avg_pages FROM (SELECT session_id, count(*) AS pages FROM events "
        "WHERE session_id IS NOT NULL GROUP BY session_id) AS s",
    ),
]


def normal(value):
    """A cell as every engine's answer can be compared: numbers to 6 significant digits."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) or type(value).__name__ == "Decimal":
        f = float(value)
        return 0.0 if f == 0 else float(f"{f:.6g}")
    return str(value)


def rows_of(table_rows):
    rows = [tuple(normal(v) for v in row) for row in table_rows]
    return sorted(rows, key=lambda r: tuple((v is None, str(v)) for v in r))


def active_files(table):
    from deltalake import DeltaTable

    return [urllib.parse.unquote(u.removeprefix("file://")) for u in DeltaTable(table).file_uris()]


def link_files(files):
    """The active files as one flat directory of links (partition directories flattened)."""
    where = tempfile.mkdtemp(prefix="marsad-engines-")
    # the links go when this run ends, however it ends
    atexit.register(shutil.rmtree, where, True)
    for i, f in enumerate(files):
        os.symlink(f, os.path.join(where, f"part-{i:05}.parquet"))
    return where


class DuckDb:
    name = "DuckDB"

    def __init__(self, files_dir):
        import duckdb

        self.version = duckdb.__version__
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        self.con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{files_dir}/*.parquet')")

    def run(self, sql):
        return self.con.execute(sql).fetchall()

    def rows(self, answer):
        return answer


class DataFusion:
    name = "DataFusion"

    def __init__(self, files_dir):
        import datafusion

        self.version = datafusion.__version__
        self.ctx = datafusion.SessionContext()
        self.ctx.register_parquet("events", files_dir)

    def run(self, sql):
        return self.ctx.sql(sql).collect()

    def rows(self, answer):
        out = []
        for batch in answer:
            out.extend(tuple(r.values()) for r in batch.to_pylist())
        return out


class Polars:
    name = "Polars"

    def __init__(self, files_dir):
        import polars

        self.version = polars.__version__
        self.ctx = polars.SQLContext(events=polars.scan_parquet(f"{files_dir}/*.parquet"))

    def run(self, sql):
        return self.ctx.execute(sql, eager=True)

    def rows(self, answer):
        return answer.rows()


class ChDb:
    name = "chDB"

    def __init__(self, files_dir):
        import chdb
        from chdb import session

        self.version = chdb.__version__
        self.session = session.Session()
        self.session.query(f"CREATE VIEW events AS SELECT * FROM file('{files_dir}/*.parquet', Parquet)")

    def run(self, sql):
        return self.session.query(sql, "JSONCompact").bytes()

    def rows(self, answer):
        return [tuple(r) for r in json.loads(answer)["data"]]


class MarsadHttp:
    name = "Marsad /v1/sql"

    def __init__(self, url, key):
        parsed = urllib.parse.urlparse(url)
        self.version = "this tree"
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def run(self, sql):
        self.conn.request("POST", "/v1/sql", body=json.dumps({"sql": sql}), headers=self.headers)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {body[:300]!r}")
        return body

    def rows(self, answer):
        doc = json.loads(answer)
        names = [c["name"] for c in doc["columns"]]
        return [tuple(r.get(n) for n in names) for r in doc["rows"]]


class MarsadPostgres:
    name = "Marsad Postgres"

    def __init__(self, port, key):
        import psycopg2

        self.version = psycopg2.__version__.split()[0]
        self.conn = psycopg2.connect(
            host="127.0.0.1", port=port, user="engineer", password=key, dbname="marsad", sslmode="disable"
        )
        self.conn.autocommit = True

    def run(self, sql):
        with self.conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()

    def rows(self, answer):
        return answer


# Each report of `/v1/reports/{kind}` (its default 30 days, all of which the simulated events
# fall in), and the same question asked of the raw events in DuckDB: its rows and its total
# (one GROUPING SETS query), distinct visitors exact where the report merges sketches. The
# traffic report also releases bounces and session seconds, which DuckDB is not asked for.
REPORTS = [
    (
        "traffic",
        "SELECT date_trunc('day', ts) AS period, count(*) AS events, "
        "sum(CASE WHEN event_type = 'page_view' THEN 1 ELSE 0 END) AS page_views, "
        "count(DISTINCT session_id) AS sessions, count(DISTINCT visitor_key) AS visitors "
        "FROM events GROUP BY GROUPING SETS ((date_trunc('day', ts)), ())",
    ),
    (
        "geo",
        "SELECT country, count(*) AS events, sum(CASE WHEN event_type = 'page_view' THEN 1 ELSE 0 END) AS page_views, "
        "count(DISTINCT visitor_key) AS visitors FROM events GROUP BY GROUPING SETS ((country), ())",
    ),
    (
        "devices",
        "SELECT device_type, os, browser, count(*) AS events, "
        "sum(CASE WHEN event_type = 'page_view' THEN 1 ELSE 0 END) AS page_views, "
        "count(DISTINCT visitor_key) AS visitors FROM events GROUP BY GROUPING SETS ((device_type, os, browser), ())",
    ),
    (
        "categories",
        "SELECT page_category, count(*) AS events, "
        "sum(CASE WHEN event_type = 'page_view' THEN 1 ELSE 0 END) AS page_views, "
        "count(DISTINCT visitor_key) AS visitors FROM events GROUP BY GROUPING SETS ((page_category), ())",
    ),
    (
        "campaigns",
        "SELECT campaign_id, sum(CASE WHEN event_type = 'ad_impression' THEN 1 ELSE 0 END) AS impressions, "
        "sum(CASE WHEN event_type = 'ad_click' THEN 1 ELSE 0 END) AS clicks, count(DISTINCT visitor_key) AS visitors "
        "FROM events WHERE campaign_id IS NOT NULL GROUP BY GROUPING SETS ((campaign_id), ())",
    ),
    (
        "demographics",
        "SELECT age_band, gender, count(*) AS events, count(DISTINCT visitor_key) AS visitors "
        "FROM events WHERE age_band IS NOT NULL GROUP BY GROUPING SETS ((age_band, gender), ())",
    ),
]


class MarsadReports:
    name = "Marsad report"

    def __init__(self, url, key, recompute=False):
        parsed = urllib.parse.urlparse(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
        self.headers = {"Authorization": f"Bearer {key}"}
        if recompute:
            # computed from the tables every time, not answered from what the session kept
            self.headers["Cache-Control"] = "no-cache"

    def run(self, kind):
        self.conn.request("GET", f"/v1/reports/{kind}", headers=self.headers)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"report {kind}: {resp.status}: {body[:300]!r}")
        return json.loads(body)


def marsad_sql(url, key, sql):
    engine = MarsadHttp(url, key)
    return engine.rows(engine.run(sql))


def reports(args, duckdb):
    """Each report against DuckDB answering its question from raw `events`, and how many
    rows the traffic rollup holds against the keys it has (the bound compaction keeps)."""
    marsad = MarsadReports(args.url, args.reports_key)
    for kind, _ in REPORTS:
        answer = marsad.run(kind)
        if not answer["rows"]:
            sys.exit(f"report {kind}: no row released: {json.dumps(answer)[:300]}")
    rows, keys = marsad_sql(
        args.url,
        args.key,
        "SELECT (SELECT count(*) FROM traffic_hourly) AS row_count, (SELECT count(*) FROM (SELECT DISTINCT hour, country, region, "
        "device_type, os, browser, language, page_category, referrer_domain, event_type FROM traffic_hourly) AS k) AS key_count",
    )[0]
    print(
        f"  reports (analyst key, default 30 days) against DuckDB asking raw `events`; "
        f"traffic_hourly holds {rows:,} rows for {keys:,} keys"
    )
    computed = MarsadReports(args.url, args.reports_key, recompute=True)
    width = max(len(kind) for kind, _ in REPORTS) + 7
    print(
        "  computed: from the tables (Cache-Control: no-cache); kept: asked again of the same table versions"
    )
    print(
        f"  {'report':<{width}} {'Marsad computed':>17}{'Marsad kept':>17}{'DuckDB':>17}"
        f"{'computed/DuckDB':>17}{'kept/DuckDB':>17}"
    )
    ratios, kept_ratios = [], []
    for kind, sql in REPORTS:
        ours, kept, theirs = median_ms(computed, kind), median_ms(marsad, kind), median_ms(duckdb, sql)
        ratios.append(ours / theirs)
        kept_ratios.append(kept / theirs)
        print(
            f"  {kind:<{width}} {ours:>17.2f}{kept:>17.2f}{theirs:>17.2f}"
            f"{ours / theirs:>16.2f}x{kept / theirs:>16.2f}x",
            flush=True,
        )
    print(f"  {'geomean':<{width}} {'':>51}{geomean(ratios):>16.2f}x{geomean(kept_ratios):>16.2f}x")


def median_ms(engine, sql):
    engine.run(sql)
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        engine.run(sql)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", required=True, help="the events Delta table's directory")
    parser.add_argument("--url", required=True, help="Marsad's query service")
    parser.add_argument("--key", required=True, help="an engineer key")
    parser.add_argument("--reports-key", help="an analyst key: time the reports too")
    parser.add_argument("--pg-port", type=int)
    parser.add_argument("--label", default="")
    args = parser.parse_args()

    files = active_files(args.table)
    files_dir = link_files(files)
    size = sum(os.path.getsize(f) for f in files)
    engines = [DuckDb(files_dir), DataFusion(files_dir), Polars(files_dir), ChDb(files_dir)]
    engines.append(MarsadHttp(args.url, args.key))
    if args.pg_port:
        engines.append(MarsadPostgres(args.pg_port, args.key))

    # the same rows from every engine before anything is timed
    count = engines[0].run("SELECT count(*) FROM events")[0][0]
    for label, sql in QUERIES:
        expected = rows_of(engines[0].rows(engines[0].run(sql)))
        for engine in engines[1:]:
            got = rows_of(engine.rows(engine.run(sql)))
            if got != expected:
                sys.exit(f"{label}: {engine.name} answered {got[:5]}…, DuckDB {expected[:5]}…")

    print(
        f"{args.label}: {count:,} events in {len(files)} files ({size / 2**20:.1f} MiB); "
        f"median of {RUNS} warm runs, ms; every engine returned the same rows"
    )
    print("  " + " ".join(f"{e.name} {e.version}" for e in engines[:4]))
    width = max(len(label) for label, _ in QUERIES)
    print(f"  {'query':<{width}} " + "".join(f"{e.name:>17}" for e in engines))
    timings = {e.name: [] for e in engines}
    for label, sql in QUERIES:
        line = f"  {label:<{width}} "
        for engine in engines:
            ms = median_ms(engine, sql)
            timings[engine.name].append(ms)
            line += f"{ms:>17.2f}"
        print(line, flush=True)
    data_queries = slice(1, None)  # the geomeans leave out SELECT 1 (no data)
    for base in ("DuckDB", "DataFusion"):
        line = f"  {'geomean vs ' + base:<{width}} "
        for engine in engines:
            ratios = [
                t / b for t, b in zip(timings[engine.name][data_queries], timings[base][data_queries])
            ]
            line += f"{geomean(ratios):>16.2f}x"
        print(line)
    if args.reports_key:
        reports(args, engines[0])


main()
