"""The safety service process: `uvicorn services.safety.app:app`."""

from services.safety.api import router
from services.safety.handlers import handlers
from shared.events import DOSING, ENROLLMENT, SAFETY
from shared.service import ServiceSpec, create_app

spec = ServiceSpec(name="safety", router=router, consumes=[ENROLLMENT, DOSING, SAFETY],
                   handlers=handlers())
app = create_app(spec)
