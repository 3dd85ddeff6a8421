"""`shared.migrate.HEADS`, which lets a start skip Alembic, is what Alembic itself reads."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory

from shared.migrate import HEADS, MIGRATIONS


def test_heads_are_alembics_own() -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert frozenset(ScriptDirectory.from_config(config).get_heads()) == HEADS
