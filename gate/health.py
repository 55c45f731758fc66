"""
C{/metrics}, C{/health} and C{/ready} on C{listen.metrics}
(PROTOCOL.md section 6).
"""

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from gate.deadline import DeadlineChannel


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, render):
        Resource.__init__(self)
        self._render = render

    def render_GET(self, request):
        return self._render(request)


class _Root(Resource):
    def getChild(self, name, request):
        return notFound()


def health_site(gate):
    """
    @param gate: the L{gate.service.GateService}; C{gate.is_ready()} says
        whether it accepts clients and reaches its backend and store.
    """
    root = _Root()

    def metrics(request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(gate.metrics.registry)

    def health(request):
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"

    def ready(request):
        request.setHeader(b"content-type", b"text/plain")
        problem = gate.not_ready_because()
        if problem is None:
            return b"ready\n"
        request.setResponseCode(503)
        return f"not ready: {problem}\n".encode("utf-8")

    root.putChild(b"metrics", _Leaf(metrics))
    root.putChild(b"health", _Leaf(health))
    root.putChild(b"ready", _Leaf(ready))
    site = Site(root)
    site.protocol = DeadlineChannel
    site.request_timeout = gate.config["api.request_timeout"]
    site.noisy = False
    site.log = lambda request: None
    return site
