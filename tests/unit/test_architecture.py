"""The shape every service keeps: pure domains that import no framework, and a kernel that never
imports a service."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What a pure module may not need: the web framework, the database, the broker, HTTP.
BLOCKED = ("fastapi", "starlette", "sqlalchemy", "aiokafka", "httpx", "aiohttp")
DOMAINS = sorted(str(p.relative_to(REPO).with_suffix("")).replace("/", ".")
                 for p in REPO.glob("services/*/domain.py"))
PURE = (
    *DOMAINS,
    "services.dosing.calendar", "services.dosing.holds",
    "services.randomization.allocation", "services.randomization.eligibility",
    "services.safety.rules", "services.safety.state", "services.efficacy.scoring",
    "services.efficacy.analysis", "services.audit.history", "services.audit.sdtm",
    "services.audit.ctcae", "services.audit.fhir", "services.audit.dsmb_report",
    # the kernel's pure parts, which the domains build on
    "shared.decider", "shared.errors", "shared.events", "shared.protocol", "shared.clock",
    "shared.permissions",
)
BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked in a pure module: {{name}}")
        return None

sys.meta_path.insert(0, Blocker())
"""


def import_blocked(module: str) -> subprocess.CompletedProcess[str]:
    """Import `module` in a fresh interpreter in which importing any BLOCKED package raises."""
    return subprocess.run([sys.executable, "-c", BLOCKER + f"import {module}\n"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_every_service_but_the_gateway_has_a_domain() -> None:
    assert DOMAINS == ["services.audit.domain", "services.dosing.domain",
                       "services.efficacy.domain", "services.randomization.domain",
                       "services.safety.domain"]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_without_framework_database_or_broker(module: str) -> None:
    result = import_blocked(module)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("module", ["shared.store", "shared.web", "services.dosing.commands"])
def test_the_blocker_stops_what_is_not_pure(module: str) -> None:
    """So the test above could fail: modules that do need them are refused under the blocker."""
    result = import_blocked(module)
    assert result.returncode != 0 and "blocked in a pure module" in result.stderr


def imports_of(source: str) -> set[str]:
    """Every module a source file imports, at any depth (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def importing(folder: str, package: str) -> list[str]:
    return [f"{path.relative_to(REPO)} imports {name}"
            for path in sorted((REPO / folder).rglob("*.py"))
            for name in sorted(imports_of(path.read_text()))
            if name == package or name.startswith(package + ".")]


def test_the_kernel_never_imports_a_service_or_the_tooling() -> None:
    assert importing("shared", "services") == []
    assert importing("shared", "tooling") == []


def test_services_never_import_the_tooling() -> None:
    assert importing("services", "tooling") == []


def test_the_import_check_sees_imports_at_any_depth() -> None:
    source = "def f():\n    from services.dosing import domain\n    import services.safety\n"
    assert imports_of(source) == {"services.dosing", "services.safety"}
