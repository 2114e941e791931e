"""Bring the database schema up to date with the package's Alembic migrations (run at every start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import Engine

SCRIPTS = Path(__file__).parent / "alembic"


def alembic_config() -> AlembicConfig:
    """Alembic's settings, pointing at the migrations inside the package (no alembic.ini needed)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(SCRIPTS))
    return config


def upgrade(engine: Engine) -> None:
    """Apply every migration not yet applied (a no-op on an up-to-date database)."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
