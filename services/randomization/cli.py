"""`trial allocation-list`: regenerate a concealed block sequence offline, from the secret: a
stratum's own, or its sequence over the open arms while an arm was suspended (the `sequence` an
`AllocationSlotUsed` names)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from services.randomization.allocation import sequence, sequence_arms
from shared.protocol import default_protocol, load_protocol


def allocation_list(
        secret: str = typer.Option(..., envvar="TRIAL_RANDOMIZATION_SECRET",
                                   help="the randomization service's secret"),
        stratum: str = typer.Option(..., help="site:band, e.g. S1:pasi_lt20, or a sequence over "
                                             "the open arms, e.g. S1:pasi_lt20|msc_low+mtx"),
        count: int = typer.Option(30, min=1, max=10_000, help="how many slots"),
        protocol_dir: Path | None = typer.Option(None, envvar="TRIAL_PROTOCOL_DIR",
                                                 help="protocol version folder (default: v1)"),
        as_json: bool = typer.Option(False, "--json", help="one JSON object per slot")) -> None:
    """List the first COUNT slots of STRATUM's permuted-block sequence (statisticians only)."""
    config = (load_protocol(protocol_dir) if protocol_dir else default_protocol()).randomization
    try:
        own_stratum, arms = sequence_arms(stratum)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--stratum") from exc
    for s in sequence(secret.encode(), config, own_stratum, count, arms):
        if as_json:
            typer.echo(json.dumps({"stratum": stratum, "slot": s.slot, "block": s.block_index,
                                   "block_size": s.block_size, "position": s.position,
                                   "arm": s.arm}))
        else:
            typer.echo(f"{stratum}\t{s.slot}\tblock {s.block_index}\tsize {s.block_size}\t"
                       f"position {s.position}\t{s.arm}")
