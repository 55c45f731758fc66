"""
Tests for L{gate.registration.Registrar}: C{POST /gates} at start, every
C{backend.register_interval} seconds, on drain and stop, never failing the
gate (PROTOCOL.md section 4).
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gate.registration import Registrar

from tests.fakes import FakeBackend


class Unreachable(Exception):
    pass


class RegistrarTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.backend = FakeBackend()
        self.described = 0

    def describe(self):
        self.described += 1
        return "http://gate:8090", ["tcp://gate:8080", "ws://gate:8081/ws"]

    def registrar(self, interval=30.0):
        return Registrar(self.clock, self.backend, "g1", interval,
                         self.describe)

    def bodies(self):
        return [p.args[0] for p in self.backend.registrations]

    def test_announce_at_start(self):
        registrar = self.registrar()
        registrar.startService()
        self.assertEqual(self.bodies(), [
            {"gate_id": "g1", "state": "up", "api_url": "http://gate:8090",
             "listen": ["tcp://gate:8080", "ws://gate:8081/ws"]}])
        registrar.stopService()

    def test_every_interval(self):
        registrar = self.registrar(30.0)
        registrar.startService()
        self.clock.advance(29.9)
        self.assertEqual(len(self.bodies()), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.bodies()), 2)
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertEqual(len(self.bodies()), 4)
        self.assertEqual(self.described, 4)
        registrar.stopService()
        self.clock.advance(300)
        self.assertEqual(len(self.bodies()), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_interval_zero(self):
        """
        C{register_interval = 0} sends only the registration at start.
        """
        registrar = self.registrar(0)
        registrar.startService()
        self.clock.advance(1000)
        self.assertEqual(len(self.bodies()), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        registrar.stopService()

    def test_failures_never_stop(self):
        """
        A failed registration is logged, not raised, and the next interval
        tries again.
        """
        self.backend.register_outcomes = [Unreachable("down"),
                                          Unreachable("down")]
        registrar = self.registrar(10)
        registrar.startService()
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(len(self.bodies()), 3)
        self.assertEqual([p.outcome for p in self.backend.registrations],
                         ["failed", "failed", "ok"])
        self.assertTrue(registrar.running)
        registrar.stopService()

    def test_announce_result(self):
        registrar = self.registrar(0)
        self.assertIs(self.successResultOf(registrar.announce()), True)
        self.backend.register_outcomes = [Unreachable("down")]
        self.assertIs(self.successResultOf(registrar.announce()), False)

    def test_states(self):
        registrar = self.registrar(10)
        registrar.startService()
        self.successResultOf(registrar.announce("draining"))
        self.clock.advance(10)
        self.successResultOf(registrar.announce("down"))
        self.assertEqual([b["state"] for b in self.bodies()],
                         ["up", "draining", "draining", "down"])
        registrar.stopService()

    def test_slow_backend_does_not_pile_up(self):
        """
        While one registration waits for an answer, the loop does not send
        more.
        """
        self.backend.register_outcomes = ["pending"]
        registrar = self.registrar(10)
        registrar.startService()
        self.clock.advance(50)
        self.assertEqual(len(self.bodies()), 1)
        self.backend.registrations[0].d.callback(None)
        self.clock.advance(10)
        self.assertEqual(len(self.bodies()), 2)
        registrar.stopService()
