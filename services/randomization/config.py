"""The randomization service's own setting: the secret that seeds the concealed sequence."""

from __future__ import annotations

import logging

from shared.settings import DEV_RANDOMIZATION_SECRET, Settings

log = logging.getLogger(__name__)


def secret(settings: Settings) -> bytes:
    return settings.randomization_secret.get_secret_value().encode()


def warn_if_development_secret(settings: Settings) -> None:
    if settings.randomization_secret.get_secret_value() == DEV_RANDOMIZATION_SECRET:
        # Never the secret itself: only that anyone with the source could regenerate the sequence.
        log.warning("TRIAL_RANDOMIZATION_SECRET is the development default: the allocation "
                    "sequence is not concealed; set a secret of your own outside development")
