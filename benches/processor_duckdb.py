"""The DuckDB job beside `cargo bench --bench processor`: the same envelopes, less work.

NDJSON envelopes in; per event a SHA-256 pseudonym of the cookie and the day, the path
scrubbed of long digit runs and e-mail addresses by regex, a coarse device from the user
agent, the ad columns; out as zstd Parquet. No GeoIP, no HMAC, no sessions, no duplicate
filter, no rollups. Prints one line with its events per CPU-second (user + system of this
process, DuckDB's threads included), measured around the query alone.

    python3 benches/processor_duckdb.py ENVELOPES.ndjson OUT_DIR
"""

import os
import resource
import sys
import time

import duckdb

COLUMNS = {
    "v": "INTEGER",
    "event": "STRUCT(type VARCHAR, url VARCHAR, referrer VARCHAR, cookie_id VARCHAR, user_id VARCHAR,"
    " event_id VARCHAR, ts TIMESTAMPTZ, ad STRUCT(ad_id VARCHAR, campaign_id VARCHAR, placement VARCHAR),"
    " consent STRUCT(analytics BOOLEAN, personalisation BOOLEAN, marketing BOOLEAN),"
    " demographics STRUCT(age_band VARCHAR, gender VARCHAR), props JSON)",
    "received_at": "TIMESTAMPTZ",
    "client_ip": "VARCHAR",
    "user_agent": "VARCHAR",
    "accept_language": "VARCHAR",
    "dnt": "BOOLEAN",
    "gpc": "BOOLEAN",
}

JOB = """
COPY (
  SELECT
    e.event.event_id AS event_id,
    e.event.type AS event_type,
    e.received_at AS ts,
    CAST(e.received_at AS DATE) AS date,
    sha256(e.event.cookie_id || '|' || CAST(CAST(e.received_at AS DATE) AS VARCHAR) || '|daily-key') AS visitor_key,
    regexp_replace(
      regexp_replace(split_part(e.event.url, '?', 1), '^https?://[^/]+', ''),
      '[0-9+]{7,}|[^/]+(@|%40)[^/]+', ':redacted', 'g') AS page_path,
    regexp_extract(e.event.referrer, '^https?://(?:www\\.)?([^/]+)', 1) AS referrer_domain,
    CASE
      WHEN e.user_agent ILIKE '%bot%' THEN 'bot'
      WHEN e.user_agent LIKE '%iPad%' THEN 'tablet'
      WHEN e.user_agent LIKE '%Mobile%' THEN 'mobile'
      ELSE 'desktop'
    END AS device_type,
    split_part(e.accept_language, '-', 1) AS language,
    e.event.ad.ad_id AS ad_id,
    e.event.ad.campaign_id AS campaign_id,
    e.event.ad.placement AS placement,
    e.event.demographics.age_band AS age_band,
    e.event.demographics.gender AS gender
  FROM read_json(?, format = 'newline_delimited', columns = {columns}) AS e
  WHERE coalesce(e.event.consent.analytics, true)
) TO '{out}' (FORMAT parquet, COMPRESSION zstd)
"""


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ndjson, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "events.parquet")
    con = duckdb.connect()
    columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in COLUMNS.items()) + "}"
    sql = JOB.replace("{columns}", columns).replace("{out}", out)
    cpu0, t0 = cpu(), time.perf_counter()
    con.execute(sql, [ndjson])
    wall, used = time.perf_counter() - t0, cpu() - cpu0
    rows = con.execute("SELECT count(*) FROM read_parquet(?)", [out]).fetchone()[0]
    lines = sum(1 for _ in open(ndjson, "rb"))
    print(
        f"{rows} rows of {lines}; wall {wall:.2f}s, cpu {used:.2f}s → {lines / used:.0f} events/cpu-s "
        f"(duckdb {duckdb.__version__})"
    )


if __name__ == "__main__":
    main()
