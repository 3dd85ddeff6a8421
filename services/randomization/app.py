"""The randomization service process: `uvicorn services.randomization.app:app`."""

from services.randomization.api import router
from services.randomization.commands import (
    fail_closed_on_safety_record,
    unapplied_safety_records,
)
from services.randomization.config import warn_if_development_secret
from services.randomization.handlers import handlers
from shared.app import create_app
from shared.events import EFFICACY, SAFETY
from shared.runtime import ServiceSpec
from shared.settings import Settings

spec = ServiceSpec(name="randomization", router=router, consumes=[SAFETY, EFFICACY], handlers=handlers,
                   fail_closed={SAFETY: fail_closed_on_safety_record},
                   unapplied=unapplied_safety_records)
settings = Settings(service_name=spec.name)
warn_if_development_secret(settings)
app = create_app(spec, settings)  # reads the protocol: a bad version folder stops the start
