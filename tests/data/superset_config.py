"""Superset's configuration for `tests/data/superset_check.py`: its own metadata in a
throw-away SQLite file, no event log (its table is not created: no `superset db upgrade`)."""

import os

from superset.utils.log import AbstractEventLogger

SECRET_KEY = os.environ["SUPERSET_SECRET_KEY"]
SQLALCHEMY_DATABASE_URI = "sqlite:///" + os.path.join(os.environ["SUPERSET_HOME"], "superset.db")


class NoEventLog(AbstractEventLogger):
    def log(self, *args, **kwargs):
        pass


EVENT_LOGGER = NoEventLog()
