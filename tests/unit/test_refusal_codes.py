"""Every refusal code the domains and the permission matrix raise has its HTTP status in the web
layer's one table, and every code in the table is raised somewhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shared.errors import Refused
from shared.web import REFUSAL_STATUS, refusal_problem

REPO = Path(__file__).resolve().parents[2]


def raised_codes() -> dict[str, str]:
    """code -> where: every `Refused("code", ...)` in the services and the kernel."""
    found: dict[str, str] = {}
    for path in sorted([*REPO.glob("services/**/*.py"), *REPO.glob("shared/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "Refused"):
                first = node.args[0] if node.args else None
                assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                    f"{path}:{node.lineno}: a refusal code must be a literal"
                found.setdefault(first.value, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_raised_code_has_a_status() -> None:
    codes = raised_codes()
    assert len(codes) > 30
    assert {c: where for c, where in codes.items() if c not in REFUSAL_STATUS} == {}


def test_every_code_in_the_table_is_raised() -> None:
    assert set(REFUSAL_STATUS) - set(raised_codes()) == set()


@pytest.mark.parametrize("status", [403, 404, 409, 422])
def test_refusals_are_client_errors_with_their_details(status: int) -> None:
    code = next(c for c, s in REFUSAL_STATUS.items() if s == status)
    problem = refusal_problem(Refused(code, "why", rule_id="R2"))
    assert (problem.status, problem.code, problem.title, problem.extra) == (
        status, code, "why", {"rule_id": "R2"})


def test_an_unknown_code_is_still_a_client_error() -> None:
    assert refusal_problem(Refused("no_such_code", "why")).status == 422
