"""Pulls results from Marsad's Arrow Flight SQL port with the ADBC Flight SQL driver (from
PyPI) into pyarrow and into Polars, as a data engineer would, and prints what it saw as one
JSON object for `tests/clients.rs`. Nothing is asserted here; each client's error is reported.

Usage: python3 flight_clients.py URI CA_PEM_FILE ENGINEER ENGINEER_KEY ANALYST ANALYST_KEY
"""

import json
import sys
import traceback
import warnings

import adbc_driver_flightsql.dbapi as flight
import polars
import pyarrow

warnings.simplefilter("ignore")  # "Cannot disable autocommit": Marsad is read-only anyway


def attempt(what, f):
    try:
        return f()
    except Exception as e:  # reported, not raised: the test says which call failed
        return {"error": f"{what}: {type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}


def main():
    uri, ca_file, engineer, engineer_key, analyst, analyst_key = sys.argv[1:7]
    with open(ca_file) as f:
        ca = f.read()
    tls = {"adbc.flight.sql.client_option.tls_root_certs": ca}

    def connect(**kwargs):
        return flight.connect(uri, db_kwargs={**tls, **kwargs})

    def bearer(key):
        return connect(**{"adbc.flight.sql.authorization_header": f"Bearer {key}"})

    def engineer_by_header():
        with bearer(engineer_key) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT country, count(*) AS page_views FROM events WHERE event_type = 'page_view' GROUP BY country"
            )
            table = cur.fetch_arrow_table()
            cur.execute("SELECT event_id, ts, country, is_bot FROM events")
            rows = cur.fetch_arrow_table()
            objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
            tables = sorted(
                t["table_name"]
                for c in objects
                for s in c["catalog_db_schemas"]
                for t in s["db_schema_tables"]
            )
            return {
                "page_views_by_country": {r["country"]: r["page_views"] for r in table.to_pylist()},
                "types": {f.name: str(f.type) for f in rows.schema},
                "rows": rows.num_rows,
                "distinct_event_ids": len(set(rows.column("event_id").to_pylist())),
                "tables": tables,
                "vendor": conn.adbc_get_info().get("vendor_name"),
            }

    def engineer_by_password():
        with connect(username=engineer, password=engineer_key) as conn:
            frame = polars.read_database(
                "SELECT country, count(*) AS page_views FROM events WHERE event_type = 'page_view' GROUP BY country",
                connection=conn,
            )
            return {
                "polars_page_views_by_country": dict(zip(frame["country"].to_list(), frame["page_views"].to_list())),
                "polars_type": type(frame).__name__,
            }

    def analyst_queries():
        out = {}
        with bearer(analyst_key) as conn:
            objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
            out["tables"] = sorted(
                t["table_name"] for c in objects for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]
            )
        with bearer(analyst_key) as conn, conn.cursor() as cur:
            try:
                cur.execute("SELECT * FROM events")
                cur.fetchall()
                out["raw_events"] = "answered"
            except Exception as e:
                out["raw_events"] = type(e).__name__
        with bearer(analyst_key) as conn, conn.cursor() as cur:
            try:
                cur.execute("SELECT country, count(*) FROM traffic_hourly GROUP BY country")
                cur.fetchall()
                out["count"] = "answered"
            except Exception as e:
                out["count"] = f"{type(e).__name__}: {e}"
        with bearer(analyst_key) as conn, conn.cursor() as cur:
            cur.execute("SELECT sum(events) AS events FROM traffic_hourly WHERE event_type = 'page_view'")
            out["released_page_views"] = cur.fetchall()[0][0]
        return out

    def wrong_key():
        try:
            with bearer("not-a-key") as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
            return "answered"
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    out = {
        "engineer_by_header": attempt("ADBC with a bearer header", engineer_by_header),
        "engineer_by_password": attempt("ADBC with user and password, into Polars", engineer_by_password),
        "analyst": attempt("ADBC as an analyst", analyst_queries),
        "wrong_key": wrong_key(),
        "versions": {"pyarrow": pyarrow.__version__, "polars": polars.__version__},
    }
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
