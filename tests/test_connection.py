"""
Tests for L{gate.connection}: flow control towards slow clients.
"""

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from gate.connection import OutputFlow


class OutputFlowTests(SynchronousTestCase):
    def setUp(self):
        self.transport = StringTransport()
        self.overflows = []
        self.drains = []
        self.flow = OutputFlow(self.transport, 100,
                               lambda: self.overflows.append(True),
                               lambda: self.drains.append(True))

    def test_not_paused_counts_nothing(self):
        self.flow.wrote(10000)
        self.assertEqual(self.flow.queued, 0)
        self.assertEqual(self.overflows, [])

    def test_pause_stops_reading(self):
        """
        A full write buffer pauses reading from the client; draining
        resumes it and tells the session.
        """
        self.flow.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.flow.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.drains, [True])

    def test_overflow_once(self):
        """
        Past C{limit} bytes written while paused the overflow is called,
        once.
        """
        self.flow.pauseProducing()
        self.flow.wrote(60)
        # Transports pause again on each write while full: no new count.
        self.flow.pauseProducing()
        self.flow.wrote(40)
        self.assertEqual(self.overflows, [])
        self.flow.wrote(1)
        self.flow.wrote(500)
        self.assertEqual(self.overflows, [True])

    def test_resume_starts_over(self):
        self.flow.pauseProducing()
        self.flow.wrote(90)
        self.flow.resumeProducing()
        self.flow.pauseProducing()
        self.flow.wrote(90)
        self.assertEqual(self.overflows, [])


class KeepReadingTests(SynchronousTestCase):
    def test_replay_ends_while_full(self):
        """
        While a replay runs the flow keeps reading when full; once the
        replay is over, the next write while still full stops reading.
        """
        transport = StringTransport()
        replaying = [True]
        flow = OutputFlow(transport, 100, lambda: None, lambda: None,
                          keep_reading=lambda: replaying[0])
        flow.pauseProducing()
        self.assertEqual(transport.producerState, "producing")
        replaying[0] = False
        flow.wrote(10)
        self.assertEqual(transport.producerState, "paused")
        flow.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
