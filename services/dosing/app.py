"""The dosing service process: `uvicorn services.dosing.app:app`."""

from services.dosing.api import router
from services.dosing.handlers import on_arm_assigned
from shared.events import ENROLLMENT, SAFETY
from shared.service import ServiceSpec, create_app

spec = ServiceSpec(name="dosing", router=router, consumes=[ENROLLMENT, SAFETY],
                   handlers={"ArmAssigned": on_arm_assigned})
app = create_app(spec)
