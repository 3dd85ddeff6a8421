"""The randomization service process: `uvicorn services.randomization.app:app`."""

from services.randomization.api import router
from services.randomization.config import protocol, warn_if_development_secret
from services.randomization.handlers import HANDLERS
from shared.events import SAFETY
from shared.service import ServiceSpec, create_app
from shared.settings import Settings

spec = ServiceSpec(name="randomization", router=router, consumes=[SAFETY], handlers=HANDLERS)
settings = Settings(service_name=spec.name)
protocol(settings)  # a bad protocol configuration stops the start, not a patient's visit
warn_if_development_secret(settings)
app = create_app(spec, settings)
