"""The safety service process: `uvicorn services.safety.app:app`."""

from services.safety.api import router
from services.safety.handlers import handlers
from shared.app import create_app
from shared.events import DOSING, ENROLLMENT, SAFETY
from shared.runtime import ServiceSpec

spec = ServiceSpec(name="safety", router=router, consumes=[ENROLLMENT, DOSING, SAFETY],
                   handlers=handlers,
                   # A fact can fire a rule here with no request waiting: the shortest linger
                   # that still gathers records at 50 randomizations a second (D84).
                   consumer_linger_ms=50)
app = create_app(spec)  # reads the protocol (TRIAL_PROTOCOL_DIR): its stopping rules, once
