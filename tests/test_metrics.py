"""
Tests for L{gate.metrics}.
"""

from prometheus_client import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from gate.metrics import MAX_ROUTE_LABELS, Metrics
from gate.player import PushResult


class MetricsTests(SynchronousTestCase):
    def setUp(self):
        self.metrics = Metrics("g1")

    def value(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def test_route_labels_bounded(self):
        """
        Routes are clients' strings: past L{MAX_ROUTE_LABELS} distinct ones
        the rest are counted as C{other}, so the metrics stay bounded.
        """
        for i in range(MAX_ROUTE_LABELS + 50):
            self.metrics.request(f"route{i}", "ok", 0.01)
        self.metrics.request("route0", "ok", 0.01)
        self.assertEqual(self.value("mmogate_requests_total", route="route0",
                                    outcome="ok"), 2)
        self.assertEqual(self.value("mmogate_requests_total", route="other",
                                    outcome="ok"), 50)
        self.assertIsNone(self.value("mmogate_requests_total",
                                     route=f"route{MAX_ROUTE_LABELS}",
                                     outcome="ok"))
        self.assertEqual(self.value("mmogate_request_seconds_count",
                                    route="other"), 50)

    def test_unknown_routes_share_a_label(self):
        """
        Routes the backend does not know do not use up route labels.
        """
        for i in range(MAX_ROUTE_LABELS + 10):
            self.metrics.request(f"nope{i}", "route_not_found", 0.01)
        self.metrics.request("echo", "ok", 0.01)
        self.assertEqual(self.value("mmogate_requests_total", route="echo",
                                    outcome="ok"), 1)
        self.assertEqual(self.value("mmogate_requests_total",
                                    route="unknown_route",
                                    outcome="route_not_found"),
                         MAX_ROUTE_LABELS + 10)

    def test_backend_codes_bounded(self):
        self.metrics.request("echo", "my_custom_code", 0.01)
        self.assertEqual(self.value("mmogate_requests_total", route="echo",
                                    outcome="backend_code"), 1)

    def test_push_outcomes(self):
        result = PushResult()
        result.delivered, result.queued, result.dropped = 3, 2, 1
        result.unknown = ["x"]
        self.metrics.pushed(result)
        self.metrics.broadcast(5)
        for outcome, n in (("delivered", 8), ("queued", 2), ("dropped", 1),
                           ("unknown", 1)):
            self.assertEqual(self.value("mmogate_pushes_total",
                                        outcome=outcome), n)

    def test_sessions_and_pool(self):
        self.metrics.session_opened("tcp")
        self.metrics.session_opened("ws")
        self.metrics.session_closed("tcp")
        self.metrics.pool(4, 1, 7)
        self.metrics.players(3, 2)
        self.assertEqual(self.value("mmogate_sessions", transport="ws"), 1)
        self.assertEqual(self.value("mmogate_sessions", transport="tcp"), 0)
        self.assertEqual(self.value("mmogate_workers"), 4)
        self.assertEqual(self.value("mmogate_workers_busy"), 1)
        self.assertEqual(self.value("mmogate_worker_queue"), 7)
        self.assertEqual(self.value("mmogate_players", state="online"), 3)
        self.assertEqual(self.value("mmogate_players", state="offline"), 2)
        self.assertIn(b"mmogate_sessions", generate_latest(self.metrics.registry))
