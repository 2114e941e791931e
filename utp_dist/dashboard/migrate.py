"""Bring the database schema up to date with the package's Alembic migrations (run at every start).

Importing Alembic costs about 0.2 s of the server's start, so Alembic is loaded only when there is something to
migrate: a database that already stamps the newest revision is recognised with one query, and a new, empty one gets the
tables of the models and the newest revision's stamp at once (Alembic's cookbook, "building an up to date database from
scratch"; a test holds the models equal to the migrated schema on SQLite and PostgreSQL).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, inspect, text
from sqlalchemy.engine import Connection, Engine

from utp_dist.dashboard.db import Base

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

SCRIPTS = Path(__file__).parent / "alembic"
# Alembic's own version table, as `alembic stamp` creates it
VERSION_TABLE = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def head_revision() -> str:
    """The newest migration's revision id, from the file names alone: each migration file is named after its revision
    ("0007_run_table.py" has revision "0007") and revisions count up (a test holds this against Alembic's own view)."""
    return max(path.name.split("_", 1)[0] for path in (SCRIPTS / "versions").glob("[0-9]*_*.py"))


def alembic_config() -> AlembicConfig:
    """Alembic's settings, pointing at the migrations inside the package (no alembic.ini needed)."""
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(SCRIPTS))
    return config


def stamped(connection: Connection) -> str | None:
    """The revision the database says it is at; None for a new database (no version table yet)."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine) -> None:
    """Apply every migration not yet applied (a no-op on an up-to-date database; a new one is built from the models;
    neither loads Alembic)."""
    with engine.begin() as connection:
        revision = stamped(connection)
        if revision == head_revision():
            return
        if revision is None and not inspect(connection).get_table_names():
            Base.metadata.create_all(connection)
            VERSION_TABLE.create(connection)
            connection.execute(VERSION_TABLE.insert().values(version_num=head_revision()))
            return
        from alembic import command

        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
