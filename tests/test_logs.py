"""
Tests for L{gate.logs}: structured JSON log lines.
"""

import io
import json

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gate import logs


class JSONLineObserverTests(SynchronousTestCase):
    def setUp(self):
        self.stream = io.StringIO()
        self.publisher = LogPublisher()
        self.log = Logger(namespace="gate.test", observer=self.publisher)

    def lines(self):
        return [json.loads(line) for line in
                self.stream.getvalue().splitlines()]

    def test_fields(self):
        """
        Each event is one JSON object with the level, namespace, formatted
        message, the gate id and the event's own fields.
        """
        self.publisher.addObserver(logs.JSONLineObserver(self.stream, "g1"))
        self.log.info("session {session_id} bound to player {player_id}",
                      session_id="s1", player_id="alice", peer=("x", 1))
        [line] = self.lines()
        self.assertEqual(line["msg"], "session s1 bound to player alice")
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["ns"], "gate.test")
        self.assertEqual((line["gate_id"], line["session_id"],
                          line["player_id"]), ("g1", "s1", "alice"))
        self.assertIsInstance(line["time"], float)
        # Values that are not plain JSON scalars are left out, not crashed on.
        self.assertNotIn("peer", line)

    def test_process_gate_id(self):
        """
        An observer made before the configuration was read (twistd
        --logger) takes the gate id the gate announces when it starts.
        """
        logs.set_gate_id(None)
        self.addCleanup(logs.set_gate_id, None)
        self.publisher.addObserver(logs.JSONLineObserver(self.stream))
        self.log.info("before")
        logs.set_gate_id("g2")
        self.log.info("after")
        first, second = self.lines()
        self.assertNotIn("gate_id", first)
        self.assertEqual(second["gate_id"], "g2")

    def test_failure(self):
        """
        A logged failure carries its traceback.
        """
        self.publisher.addObserver(logs.JSONLineObserver(self.stream, "g1"))
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("it broke")
        [line] = self.lines()
        self.assertEqual(line["level"], "critical")
        self.assertIn("ZeroDivisionError", line["traceback"])
