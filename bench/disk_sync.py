"""Benchmark (context for issue 13, targets 3 and 8): how long the disk takes to make a write
durable, where the system keeps its SQLite files.

    .venv/bin/python -m bench.disk_sync [--dir DIR] [--count 1000] [--interval-ms 10]

Every commit on the embedded default waits for its write-ahead log to be on disk
(`synchronous=FULL`, shared/db.py), so the tail of a commit, and of every request and consumed
record that commits, is at least the tail of one `fdatasync` on that disk. This writes a 4 KiB
page and syncs it --count times, one every --interval-ms (a commit's pace, not a flood), two
ways: overwriting the same few pages (a WAL that is reused after its checkpoint) and appending
(a WAL that grows: the file's size changes, so the file system's journal commits too). The
peer is the same on tmpfs (/dev/shm), the floor with no disk under it. Run it on the
deployment's own disk and beside a latency benchmark: a p99 of tens of milliseconds here puts
the same into every commit's tail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PAGE = b"\x5a" * 4096
STALL_MS = 50.0  # a sync this long is a stall: half of target 3's p99 at 50/s


def _syncs(folder: Path, count: int, interval_s: float, append: bool
           ) -> list[tuple[float, float]]:
    """Each sync's start (wall clock, s) and duration (ms)."""
    path = folder / f"bench-disk-sync-{os.getpid()}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    took: list[tuple[float, float]] = []
    try:
        for i in range(count):
            os.pwrite(fd, PAGE, (i if append else i % 16) * len(PAGE))
            at, started = time.time(), time.perf_counter()
            os.fdatasync(fd)
            took.append((at, (time.perf_counter() - started) * 1000))
            time.sleep(interval_s)  # a commit's pace: the disk is not flooded
    finally:
        os.close(fd)
        path.unlink()
    return took


def _writers(folder: Path, count: int, interval_s: float, append: bool, writers: int
             ) -> list[list[tuple[float, float]]]:
    """`_syncs` in `writers` processes at once, as the system's services each sync their own
    database: what one writer's stall does to the others shows."""
    if writers == 1:
        return [_syncs(folder, count, interval_s, append)]
    with ProcessPoolExecutor(writers) as pool:
        return list(pool.map(_syncs, *zip(*[(folder, count, interval_s, append)] * writers,
                                            strict=True)))


def _stalls(runs: list[list[tuple[float, float]]]) -> str:
    """Syncs over STALL_MS, grouped into episodes (overlapping in time): how many, the longest,
    how many writers each caught, and the share of the run spent inside them."""
    slow = sorted((at, at + ms / 1000, n) for n, run in enumerate(runs) for at, ms in run
                  if ms > STALL_MS)
    episodes: list[tuple[float, float, set[int]]] = []
    for start, end, writer in slow:
        if episodes and start <= episodes[-1][1]:
            first, last, caught = episodes[-1]
            episodes[-1] = (first, max(last, end), caught | {writer})
        else:
            episodes.append((start, end, {writer}))
    span = max(at for run in runs for at, _ in run) - min(at for run in runs for at, _ in run)
    if not episodes:
        return f"no sync over {STALL_MS:g} ms in {span:.0f} s"
    inside = sum(last - first for first, last, _ in episodes)
    widths = sorted(len(c) for _, _, c in episodes)
    return (f"{len(episodes)} episodes of syncs over {STALL_MS:g} ms in {span:.0f} s, the "
            f"longest {max(last - first for first, last, _ in episodes) * 1000:.0f} ms, writers "
            f"caught each: median {statistics.median(widths):g} of {len(runs)}; "
            f"{100 * inside / span:.1f} % of the time inside one")


def _line(label: str, took: list[float]) -> str:
    cuts = statistics.quantiles(took, n=1000, method="inclusive")
    slow = sum(1 for t in took if t > 20)
    return (f"  {label:<34} p50={cuts[499]:7.2f} ms  p99={cuts[989]:7.2f} ms  "
            f"p99.9={cuts[998]:7.2f} ms  max={max(took):7.2f} ms  over 20 ms: {slow}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where to write (default: the temporary folder, where bench/system.py "
                             "puts the system's SQLite files)")
    parser.add_argument("--peer-dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--writers", type=int, default=1,
                        help="processes syncing at once, each its own file (the system has five "
                             "databases); with more than one, the stalls they share are shown")
    args = parser.parse_args()
    print(f"dir={args.dir} peer={args.peer_dir} count={args.count} "
          f"interval={args.interval_ms:g} ms, 4 KiB a write, fdatasync after each, "
          f"{args.writers} writer(s)")
    figures: dict[str, list[float]] = {}
    for append in (False, True):
        way = "appending" if append else "overwriting"
        for label, folder in ((f"disk, {way} (project)", args.dir),
                              (f"tmpfs, {way} (peer)", args.peer_dir)):
            if not folder.is_dir():
                print(f"  {label:<34} skipped: {folder} is not a folder")
                continue
            runs = _writers(folder, args.count, args.interval_ms / 1000, append, args.writers)
            figures[label] = [ms for run in runs for _, ms in run]
            print(_line(label, figures[label]), flush=True)
            print(f"  {'':<34} {_stalls(runs)}", flush=True)
    disk = sorted(figures.get("disk, overwriting (project)", []))
    if disk:
        p99 = statistics.quantiles(disk, n=100, method="inclusive")[98]
        print(f"at p99 a commit on this disk waits at least {p99:.2f} ms: its fdatasync alone")


if __name__ == "__main__":
    main()
