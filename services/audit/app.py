"""The audit ledger process: `uvicorn services.audit.app:app`."""

from services.audit.api import router
from services.audit.handlers import record
from shared.consumer import ANY_TYPE
from shared.events import TOPICS
from shared.service import ServiceSpec, create_app

spec = ServiceSpec(name="audit", router=router, consumes=list(TOPICS),
                   handlers={ANY_TYPE: record}, publishes=False)
app = create_app(spec)
