"""Keeping optional packages that nothing in a service uses out of its process (memory, D60).

Some libraries the services need import an optional package whenever it is installed: structlog
imports `rich` for pretty tracebacks, alembic (through mako) imports `pygments` for highlighted
template errors, httpx imports click, rich and pygments for its command line. They are installed
beside the services only because the operators' CLI (`trial`: typer, rich) uses them, and
they cost each service process about 90 modules and 8 MB for output it never writes.
`without` makes them look not installed for the length of one import.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def without(*packages: str) -> Iterator[None]:
    """Inside, `import <package>` fails as if the package were not installed, unless this process
    imported it already (the CLI has rich: it keeps it). Afterwards whoever imports them gets them:
    only what was imported inside went without."""
    blocked = [name for name in packages if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # import machinery: "not found"
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]
