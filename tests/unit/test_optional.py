"""A service's process loads no package that only the operators' CLI uses, nor Alembic once its
database is at the newest revision (D60, issue 13 target 7); `without` hides a package for one
import only."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.migrate import upgrade
from shared.optional import without

REPO = Path(__file__).resolve().parents[2]
CLI_ONLY = ("rich", "pygments", "click")
LOADED = """
import asyncio, json, sys
import {module}
from shared.migrate import upgrade
asyncio.run(upgrade({url!r}))
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
"""


def loaded_by(module: str, url: str) -> set[str]:
    """The top-level packages a fresh interpreter holds once it has imported `module` (a service's
    app, created at import) and brought the database at `url` to the newest revision, as a
    service's start does."""
    result = subprocess.run([sys.executable, "-c", LOADED.format(module=module, url=url)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.splitlines()[-1]))


def sqlite(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'service.db'}"


@pytest.mark.parametrize("module", ["services.dosing.app", "services.gateway.app"])
def test_a_started_service_loads_neither_the_clis_packages_nor_alembic(module: str,
                                                                      tmp_path: Path) -> None:
    asyncio.run(upgrade(sqlite(tmp_path)))  # as `trial run` does before it starts the services
    loaded = loaded_by(module, sqlite(tmp_path))
    assert {"structlog", "fastapi", "sqlalchemy"} <= loaded  # what would have pulled them in
    assert loaded.isdisjoint({*CLI_ONLY, "alembic", "mako"}), sorted(loaded & {*CLI_ONLY, "alembic"})


def test_a_service_that_migrates_its_own_database_loads_alembic_without_pygments(
        tmp_path: Path) -> None:
    loaded = loaded_by("services.dosing.app", sqlite(tmp_path))
    assert {"alembic", "mako"} <= loaded
    assert loaded.isdisjoint(CLI_ONLY), sorted(loaded & set(CLI_ONLY))


def test_the_check_sees_them_when_they_are_loaded(tmp_path: Path) -> None:
    """So the tests above could fail: the same check on a process that imports rich."""
    assert "rich" in loaded_by("rich.console", sqlite(tmp_path))


def test_without_hides_a_package_for_one_import_only() -> None:
    name = "colorsys"  # a standard module nothing here uses
    sys.modules.pop(name, None)
    with without(name), pytest.raises(ImportError):
        import colorsys  # noqa: F401
    import colorsys as again

    assert again.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)


def test_without_leaves_a_package_already_imported() -> None:
    import json as already

    with without("json"):
        import json as inside
    assert inside is already
