"""The randomization service process: `uvicorn services.randomization.app:app`."""

from services.randomization.api import router
from shared.service import ServiceSpec, create_app

spec = ServiceSpec(name="randomization", router=router)
app = create_app(spec)
