"""
Tests for L{gate.health}: C{/health}, C{/ready} and C{/metrics} of
PROTOCOL.md section 6, on a real L{gate.service.GateService} started on a
L{MemoryReactorClock} (no sockets) with a fake backend.
"""

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from gate.health import health_site
from gate.service import GateService

from tests.fakes import FakeBackend, FakeConnection, http_request, make_config

METRIC_NAMES = ("mmogate_sessions", "mmogate_players",
                "mmogate_requests_total", "mmogate_request_seconds",
                "mmogate_pushes_total", "mmogate_workers",
                "mmogate_workers_busy", "mmogate_worker_queue",
                "mmogate_mailbox_messages", "mmogate_kicks_total",
                "mmogate_bad_input_total", "mmogate_lifecycle_events_total")


class HealthTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.backend = FakeBackend()
        self.gate = GateService(make_config(), reactor=self.reactor,
                                backend=self.backend)
        self.site = health_site(self.gate)

    def start(self):
        self.gate.privilegedStartService()
        self.gate.startService()

    def get(self, path):
        return http_request(self.site, "GET", path, clock=self.reactor)

    def test_health(self):
        for started in (False, True):
            if started:
                self.start()
            status, headers, body = self.get("/health")
            self.assertEqual((status, body), (200, b"ok\n"))

    def test_ready_when_running(self):
        self.start()
        status, _, body = self.get("/ready")
        self.assertEqual((status, body), (200, b"ready\n"))

    def test_not_ready_before_start(self):
        status, _, body = self.get("/ready")
        self.assertEqual(status, 503)
        self.assertIn(b"not running", body)

    def test_not_ready_when_not_accepting(self):
        self.start()
        self.gate.sessions.accepting = False
        status, _, body = self.get("/ready")
        self.assertEqual(status, 503)
        self.assertIn(b"accepting", body)
        self.gate.sessions.accepting = True
        self.assertEqual(self.get("/ready")[0], 200)

    def test_not_ready_when_backend_unreachable(self):
        self.start()
        self.backend.reachable = False
        status, _, body = self.get("/ready")
        self.assertEqual(status, 503)
        self.assertIn(b"backend", body)
        self.backend.reachable = True
        self.assertEqual(self.get("/ready")[0], 200)

    def test_ready_before_first_backend_call(self):
        """
        A backend not yet called (reachable unknown) does not hold a gate
        back.
        """
        self.start()
        self.backend.reachable = None
        self.assertEqual(self.get("/ready")[0], 200)

    def test_metrics_names(self):
        self.start()
        status, headers, body = self.get("/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        text = body.decode("utf-8")
        for name in METRIC_NAMES:
            self.assertIn(f"# TYPE {name.removesuffix('_total')}", text)
            self.assertIn(name, text)

    def test_metrics_values(self):
        self.start()
        session = self.gate.sessions.open(FakeConnection("ws"))
        session.receive(b"[]")
        self.gate.players.mailboxes.append(["p"], "r", None, 0.0)
        self.gate.players.mailboxes.append(["p"], "r", None, 0.0)
        text = self.get("/metrics")[2].decode("utf-8")
        self.assertIn('mmogate_sessions{transport="ws"} 1.0', text)
        self.assertIn('mmogate_bad_input_total{code="bad_json"} 1.0', text)
        self.assertIn("mmogate_mailbox_messages 2.0", text)
        self.assertIn("mmogate_workers 8.0", text)

    def test_unknown_path(self):
        self.assertEqual(self.get("/nothing")[0], 404)
