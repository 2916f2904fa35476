"""Connects to Marsad's Postgres port with the Python clients BI tools and notebooks are
built on, does what they do on connect and when they browse a table, and prints what each
saw as one JSON object: the test (`tests/clients.rs`) compares it with what it sent.

  SQLAlchemy 2 over psycopg2 and over psycopg 3: create_engine, the inspector's reflection
  calls, a parameterised query, pandas.read_sql;
  asyncpg: a prepared statement with typed parameters, results in binary format.

Usage: python3 pg_clients.py PORT ENGINEER ENGINEER_KEY ANALYST ANALYST_KEY
Nothing is asserted here; a client's error is reported as {"error": ...}, so the test names
the client and the call that failed.
"""

import asyncio
import datetime
import json
import sys
import traceback

import asyncpg
import pandas
import sqlalchemy as sa

SINCE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)


def attempt(what, f):
    try:
        return f()
    except Exception as e:  # reported, not raised: the test says which call failed
        return {"error": f"{what}: {type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}


def sqlstate(e):
    orig = getattr(e, "orig", e)
    return getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)


def engineer_with(driver, url):
    engine = sa.create_engine(url)
    out = {}
    with engine.connect() as c:
        out["server_version_info"] = list(engine.dialect.server_version_info)
        out["page_views_since"] = c.execute(
            sa.text("SELECT count(*) FROM events WHERE event_type = :t AND ts >= :since"),
            {"t": "page_view", "since": SINCE},
        ).scalar()
        # a correlated subquery in a column: answered, not blanked
        out["correlated"] = {
            country: n
            for country, n in c.execute(
                sa.text(
                    "SELECT e.country, (SELECT count(*) FROM events x WHERE x.country = e.country) AS n "
                    "FROM events e GROUP BY e.country"
                )
            )
        }
    inspector = sa.inspect(engine)
    out["schemas"] = inspector.get_schema_names()
    out["tables"] = sorted(inspector.get_table_names())
    out["views"] = inspector.get_view_names()
    out["has_events"] = inspector.has_table("events")
    out["events_columns"] = [[c["name"], repr(c["type"]), c["nullable"]] for c in inspector.get_columns("events")]
    out["primary_key"] = inspector.get_pk_constraint("events")["constrained_columns"]
    out["foreign_keys"] = inspector.get_foreign_keys("events")
    out["indexes"] = inspector.get_indexes("events")
    out["unique_constraints"] = inspector.get_unique_constraints("events")
    out["check_constraints"] = inspector.get_check_constraints("events")
    out["table_comment"] = inspector.get_table_comment("events")["text"]
    frame = pandas.read_sql(
        sa.text("SELECT country, count(*) AS n FROM events WHERE event_type = :t GROUP BY country"),
        engine,
        params={"t": "page_view"},
    )
    out["pandas_page_views_by_country"] = {r.country: int(r.n) for r in frame.itertuples()}
    engine.dispose()
    return out


def analyst_with(driver, url):
    engine = sa.create_engine(url)
    out = {"tables": sorted(sa.inspect(engine).get_table_names())}
    with engine.connect() as c:
        try:
            c.execute(sa.text("SELECT country, count(*) FROM traffic_hourly GROUP BY country")).fetchall()
            out["count_refused"] = None
        except sa.exc.DBAPIError as e:
            out["count_refused"] = sqlstate(e)
    with engine.connect() as c:
        out["released_page_views"] = c.execute(
            sa.text("SELECT sum(events) FROM traffic_hourly WHERE event_type = :t AND hour >= :since"),
            {"t": "page_view", "since": SINCE},
        ).scalar()
    engine.dispose()
    return out


async def asyncpg_client(port, user, key):
    c = await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=key, database="marsad", ssl="require")
    try:
        statement = await c.prepare(
            "SELECT country, count(*) AS page_views, count(DISTINCT visitor_key) AS visitors, "
            "min(ts) AS first_seen, max(date) AS last_day, bool_or(is_bot) AS any_bot, avg(2.5) AS half "
            "FROM events WHERE event_type = $1 AND ts >= $2 GROUP BY country ORDER BY country"
        )
        rows = await statement.fetch("page_view", SINCE)
        return {
            "parameter_types": [t.name for t in statement.get_parameters()],
            "column_types": {a.name: a.type.name for a in statement.get_attributes()},
            "rows": [
                {k: [type(v).__name__, v.isoformat() if hasattr(v, "isoformat") else v] for k, v in r.items()}
                for r in rows
            ],
            "version": await c.fetchval("SELECT version()"),
        }
    finally:
        await c.close()


def main():
    port, engineer, engineer_key, analyst, analyst_key = sys.argv[1:6]
    port = int(port)
    out = {}
    for driver in ["psycopg2", "psycopg"]:
        base = f"postgresql+{driver}://{{}}:{{}}@127.0.0.1:{port}/marsad?sslmode=require"
        out[f"sqlalchemy_{driver}"] = attempt(
            f"SQLAlchemy + {driver} as engineer", lambda: engineer_with(driver, base.format(engineer, engineer_key))
        )
        out[f"sqlalchemy_{driver}_analyst"] = attempt(
            f"SQLAlchemy + {driver} as analyst", lambda: analyst_with(driver, base.format(analyst, analyst_key))
        )
    out["asyncpg"] = attempt("asyncpg", lambda: asyncio.run(asyncpg_client(port, engineer, engineer_key)))
    out["versions"] = {
        "sqlalchemy": sa.__version__,
        "asyncpg": asyncpg.__version__,
        "pandas": pandas.__version__,
    }
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
