"""The randomization service's protocol configuration and secret, read once from settings."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from shared.protocol import ProtocolConfig, default_protocol, load_protocol
from shared.settings import DEV_RANDOMIZATION_SECRET, Settings

log = logging.getLogger(__name__)


@lru_cache
def protocol_at(folder: Path | None) -> ProtocolConfig:
    """The built-in protocol version, or the one in `TRIAL_PROTOCOL_DIR` (validated on load)."""
    return load_protocol(folder) if folder is not None else default_protocol()


def protocol(settings: Settings) -> ProtocolConfig:
    return protocol_at(settings.protocol_dir)


def secret(settings: Settings) -> bytes:
    return settings.randomization_secret.encode()


def warn_if_development_secret(settings: Settings) -> None:
    if settings.randomization_secret == DEV_RANDOMIZATION_SECRET:
        # Never the secret itself: only that anyone with the source could regenerate the sequence.
        log.warning("TRIAL_RANDOMIZATION_SECRET is the development default: the allocation "
                    "sequence is not concealed; set a secret of your own outside development")
