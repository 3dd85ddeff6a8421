"""The protocol configuration dosing plans and guards by: the same version randomization uses."""

from __future__ import annotations

from functools import lru_cache

from shared.protocol import ProtocolConfig, default_protocol, load_protocol
from shared.settings import Settings


@lru_cache
def protocol() -> ProtocolConfig:
    """The built-in version, or the one in `TRIAL_PROTOCOL_DIR`, read and validated once."""
    folder = Settings().protocol_dir
    return load_protocol(folder) if folder is not None else default_protocol()
