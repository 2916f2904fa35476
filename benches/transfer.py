"""The three ways out of Marsad for a large result, timed from the client's side: each run
ends with the whole answer in the client's memory as columns (a pyarrow table) or as Python
rows, as a data engineer would use it. Called by `cargo bench --bench transfer`."""

import asyncio
import io
import statistics
import sys
import time
import warnings

import adbc_driver_flightsql.dbapi as flight
import asyncpg
import psycopg2
import pyarrow
import pyarrow.json
import requests

warnings.simplefilter("ignore")


def main():
    flight_uri, pg_port, http, key, rows, runs = sys.argv[1:7]
    rows, runs = int(rows), int(runs)
    sql = (
        "SELECT v AS id, v * 0.5 AS amount, concat('visitor-', CAST(v % 100000 AS VARCHAR)) AS label, "
        f"to_timestamp_seconds(1764374400 + v) AS ts FROM generate_series(1, {rows}) AS t(v)"
    )

    def over_flight():
        with flight.connect(flight_uri, db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {key}"}) as conn:
            with conn.cursor() as cur:
                cur.execute(sql)
                table = cur.fetch_arrow_table()
        return table.num_rows, pyarrow.compute.sum(table.column("id")).as_py()

    def over_psycopg2():
        conn = psycopg2.connect(host="127.0.0.1", port=pg_port, user="engineer", password=key, dbname="marsad")
        cur = conn.cursor()
        cur.execute(sql)
        fetched = cur.fetchall()
        conn.close()
        return len(fetched), sum(r[0] for r in fetched)

    def over_asyncpg():
        async def go():
            conn = await asyncpg.connect(host="127.0.0.1", port=int(pg_port), user="engineer", password=key,
                                         database="marsad", ssl=False)
            try:
                return await conn.fetch(sql)
            finally:
                await conn.close()
        fetched = asyncio.run(go())
        return len(fetched), sum(r[0] for r in fetched)

    def over_ndjson():
        resp = requests.post(f"{http}/v1/sql?format=ndjson", json={"sql": sql},
                             headers={"authorization": f"Bearer {key}"}, timeout=600)
        resp.raise_for_status()
        table = pyarrow.json.read_json(io.BytesIO(resp.content))
        return table.num_rows, pyarrow.compute.sum(table.column("id")).as_py()

    paths = [
        ("Flight SQL (ADBC → pyarrow)", over_flight),
        ("Postgres (psycopg2 rows)", over_psycopg2),
        ("Postgres (asyncpg binary rows)", over_asyncpg),
        ("/v1/sql NDJSON (→ pyarrow)", over_ndjson),
    ]
    want = (rows, rows * (rows + 1) // 2)
    times = {}
    for name, f in paths:
        answer = f()  # warm-up, and the check
        if answer != want:
            sys.exit(f"{name} returned {answer}, not {want}")
        took = []
        for _ in range(runs):
            start = time.perf_counter()
            f()
            took.append(time.perf_counter() - start)
        times[name] = statistics.median(took)
    print(f"every path returned the same {rows:,} rows (count and sum of id); seconds, median of {runs}")
    base = times[paths[0][0]]
    print(f"  {'path':<34}{'seconds':>10}{'rows/s':>14}{'vs Flight':>11}")
    for name, _ in paths:
        t = times[name]
        print(f"  {name:<34}{t:>10.2f}{rows / t:>14,.0f}{t / base:>10.2f}x")


if __name__ == "__main__":
    main()
