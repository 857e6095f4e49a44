"""The admin HTTP API: tenants (api.py), health and metrics (app.py, metrics.py), run inside the
router's event loop by server.py. ``serve(router)`` is what Router.start() calls."""

from router.admin.app import create_app
from router.admin.metrics import observe_pool_wait
from router.admin.server import AdminServer, serve

__all__ = ["AdminServer", "create_app", "observe_pool_wait", "serve"]
