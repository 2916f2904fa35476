"""Apache Superset's own code paths against Marsad's Postgres port: what its "Test
connection" button and its dataset editor run (engine spec, ping, catalogs, schemas, tables,
a table's metadata, a chart's query into a DataFrame). Prints one JSON object for
`tests/clients.rs`; nothing is asserted here.

Usage: SUPERSET_CONFIG_PATH=… python superset_check.py SQLALCHEMY_URI
(run with the Python of the virtualenv `./test` installs Superset into)
"""

import importlib.metadata
import json
import sys
import traceback

from superset.app import create_app


def main():
    uri = sys.argv[1]
    app = create_app()
    out = {}
    with app.app_context():
        from superset.models.core import Database
        from superset.sql.parse import Table

        out["superset"] = importlib.metadata.version("apache-superset")
        database = Database(database_name="marsad", sqlalchemy_uri=uri)
        out["engine_spec"] = database.db_engine_spec.__name__
        try:
            with database.get_sqla_engine() as engine:
                connection = engine.raw_connection()
                out["ping"] = bool(engine.dialect.do_ping(connection))
                connection.close()
            out["catalogs"] = sorted(database.get_all_catalog_names())
            out["default_schema"] = database.get_default_schema(None)
            out["schemas"] = sorted(database.get_all_schema_names())
            out["tables"] = sorted(t[0] for t in database.get_all_table_names_in_schema(None, "public"))
            out["views"] = sorted(t[0] for t in database.get_all_view_names_in_schema(None, "public"))
            events = Table("events", "public")
            metadata = database.db_engine_spec.get_table_metadata(database, events)
            out["columns"] = [[c["name"], c["type"]] for c in metadata["columns"]]
            out["primary_key"] = metadata["primaryKey"]["constrained_columns"]
            out["foreign_keys"] = metadata["foreignKeys"]
            out["indexes"] = metadata["indexes"]
            frame = database.get_df(
                "SELECT country, count(*) AS n FROM events WHERE event_type = 'page_view' GROUP BY country",
                "public",
            )
            out["page_views_by_country"] = {r.country: int(r.n) for r in frame.itertuples()}
        except Exception as e:  # reported: the test names the call that failed
            out["error"] = f"{type(e).__name__}: {e}"
            out["trace"] = traceback.format_exc(limit=4)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
