"""The garbage collector set for a long-running service (D65).

CPython's cyclic collector runs a young-generation pass every 700 container allocations and
scans, in its older passes, every object the process holds, most of them the modules, the app
and the protocol that live as long as the process. A service that parses a CloudEvent, a
request and a pydantic model or two per record allocates thousands of containers a second, so
the collector ran many times a second over a heap it can never free: about half of what parsing
a record cost (`bench/replay.py`). Once the process has built everything it keeps, `settle`
moves that heap out of the collector's sight (`gc.freeze`) and lets the young generation grow
larger before a pass. Reference counting still frees everything that is not in a cycle at
once; only cycles wait a little longer."""

from __future__ import annotations

import gc

from shared.settings import Settings

_settled = False


def settle(settings: Settings) -> None:
    """Call once the process is up (its app built, its runtime started). Once a process: a test
    process that starts many apps freezes only the first's heap, never the later ones' (they
    could not be collected). A threshold of 0 keeps Python's own collector settings."""
    global _settled
    threshold = settings.gc_young_threshold
    if threshold <= 0 or _settled:
        return
    _settled = True
    gc.collect()  # what start-up left as garbage is freed, not frozen
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
