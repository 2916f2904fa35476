"""Reads Marsad's Delta tables with the Python packages `deltalake` and `duckdb`
and prints the counts the interop test compares with `/v1/sql`.

Usage: python3 interop.py TABLES_DIR  ->  one JSON object on stdout.
"""

import json
import sys

import deltalake
import duckdb


def main() -> None:
    tables = sys.argv[1]
    events = deltalake.DeltaTable(f"{tables}/events")
    traffic = deltalake.DeltaTable(f"{tables}/traffic_hourly")
    events_arrow = events.to_pyarrow_table()
    traffic_arrow = traffic.to_pyarrow_table()
    con = duckdb.connect()
    con.register("events", events_arrow)
    con.register("traffic_hourly", traffic_arrow)
    by_category = dict(
        con.execute(
            "SELECT page_category, count(*) FROM events GROUP BY page_category"
        ).fetchall()
    )
    out = {
        "deltalake_events": events_arrow.num_rows,
        "deltalake_version": events.version(),
        "duckdb_events": con.execute("SELECT count(*) FROM events").fetchone()[0],
        "duckdb_distinct_visitors": con.execute(
            "SELECT count(DISTINCT visitor_key) FROM events"
        ).fetchone()[0],
        "duckdb_traffic_events": int(
            con.execute("SELECT sum(events) FROM traffic_hourly").fetchone()[0] or 0
        ),
        "duckdb_by_category": by_category,
        "partitions": sorted(events.metadata().partition_columns),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
