"""
End-to-end tests of flow control towards clients that do not read: what
the gate holds for one client is bounded, and no persistent push is lost.
"""

import socket

from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.e2e import (HTTP, assert_healthy, connect_tcp, connect_ws,
                       start_gate)

MAX_OUTBUF = 16384


@implementer(IPushProducer)
class PauseWatch:
    """
    Registered on a client transport: tells when the client's own writes
    back up, that is when the gate has stopped reading them.
    """

    paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        pass


def stop_reading(client):
    """
    The client no longer reads, with a small socket receive buffer so the
    kernel holds little for it.
    """
    client.transport.getHandle().setsockopt(socket.SOL_SOCKET,
                                            socket.SO_RCVBUF, 4096)
    client.transport.pauseProducing()


class SlowConsumerTests(TestCase):
    def kicks(self, gate):
        return gate.metrics.registry.get_sample_value(
            "mmogate_kicks_total", {"reason": "slow_consumer"}) or 0

    async def slow_consumer_loses_nothing(self, connect):
        """
        Pushes flow to a client that never reads: once more than
        C{session.max_outbuf} bytes wait for it, it is kicked with
        C{slow_consumer} and later pushes are queued; a resume then gets
        every one of them, in order, with no gap.
        """
        gate = start_gate(self, session={"max_outbuf": MAX_OUTBUF},
                          player={"mailbox_max": 100000})
        api = HTTP(self, gate)
        alice = await connect(self, gate)
        login = await alice.login("alice")
        stop_reading(alice)
        body = {"players": ["alice"], "route": "blob", "data": "x" * 1024}
        sent = 0
        queued = 0
        for batch in range(200):
            code, answer, _ = await api.post("/v1/batch",
                                              {"ops": [body] * 100})
            self.assertEqual(code, 200, answer)
            sent += 100
            queued += sum(r["queued"] for r in answer["results"])
            if queued:
                break
        self.assertTrue(queued, f"never kicked after {sent} pushes")
        self.assertEqual(self.kicks(gate), 1)
        flow = gate.sessions.sessions and next(
            iter(gate.sessions.sessions.values())).connection._flow
        if flow:
            # What waited for it in the gate stayed near the limit.
            self.assertLessEqual(flow.queued, MAX_OUTBUF + 2048)
        await alice.abort()

        again = await connect(self, gate)
        resp = await again.request({"t": "resume", "player_id": "alice",
                                    "resume_token": login["resume_token"],
                                    "last_seq": 0})
        self.assertEqual(resp["t"], "resp", resp)
        self.assertEqual(resp["last_seq"], sent)
        seqs = []
        while len(seqs) < sent:
            env = await again.next()
            self.assertEqual(env["t"], "push", env)
            seqs.append(env["seq"])
        self.assertEqual(seqs, list(range(1, sent + 1)))
        await assert_healthy(self, gate)

    def test_slow_consumer_tcp(self):
        return self.slow_consumer_loses_nothing(connect_tcp)

    def test_slow_consumer_ws(self):
        return self.slow_consumer_loses_nothing(connect_ws)

    async def test_sender_that_never_reads(self):
        """
        A client that floods requests (here pings with a large C{ts}) and
        never reads the answers is no longer read from once its answers back
        up: what the gate holds for it stays bounded however much it sends,
        and the client's own writes end up stuck.
        """
        # Flow control alone: the rate limit would close this client first.
        gate = start_gate(self, session={"rate": 1e9, "burst": 1 << 30})
        client = await connect_tcp(self, gate)
        await client.login("mallory")
        session = next(s for s in gate.sessions.sessions.values()
                       if s.player_id == "mallory")
        transport = session.connection.transport
        stop_reading(client)
        watch = PauseWatch()
        client.transport.registerProducer(watch, True)
        ping = {"t": "ping", "ts": "y" * 2000}
        written = 0
        cap = 64 * 1024 * 1024
        most_held = 0
        stuck_turns = 0
        # Without flow control the gate reads all of it and holds every
        # answer: about as much as the client wrote.
        while written < cap and stuck_turns < 50:
            if watch.paused:
                stuck_turns += 1
            else:
                stuck_turns = 0
                for _ in range(100):
                    client.send(ping)
                written += 100 * 2030
            await deferLater(reactor, 0.02 if watch.paused else 0,
                             lambda: None)
            most_held = max(most_held, gate_buffered(transport))
        self.assertLess(written, cap, "the gate kept reading everything")
        self.assertTrue(session.connection._flow.paused)
        # One transport buffer (64 KiB) plus the answers to one read.
        self.assertLess(most_held, 512 * 1024)
        self.assertFalse(session.closing)
        client.transport.unregisterProducer()
        await client.abort()
        await assert_healthy(self, gate)


def gate_buffered(transport):
    """
    Bytes the gate's transport holds in its own write buffer.
    """
    return (len(transport.dataBuffer) - transport.offset
            + transport._tempDataLen)


class ReplayTests(TestCase):
    async def test_client_heard_during_long_replay(self):
        """
        While a long mailbox is replayed to a client that reads it, the
        gate still reads from that client: a ping sent after the first
        replayed push is answered before the replay ends.
        """
        gate = start_gate(self, player={"mailbox_max": 100000})
        api = HTTP(self, gate)
        first = await connect_tcp(self, gate)
        login = await first.login("alice")
        await first.abort()
        body = {"players": ["alice"], "route": "blob", "data": "x" * 2000}
        for _ in range(5):
            code, answer, _ = await api.post("/v1/batch",
                                              {"ops": [body] * 100})
            self.assertEqual(code, 200, answer)
        client = await connect_tcp(self, gate)
        client.send({"t": "resume", "id": 1, "player_id": "alice",
                     "resume_token": login["resume_token"], "last_seq": 0})
        self.assertEqual((await client.next())["t"], "resp")
        self.assertEqual((await client.next())["seq"], 1)
        client.send({"t": "ping", "ts": "during"})
        seqs = []
        pong_after = None
        while len(seqs) < 499:
            env = await client.next()
            if env["t"] == "pong":
                pong_after = len(seqs)
            else:
                seqs.append(env["seq"])
        self.assertEqual(seqs, list(range(2, 501)))
        self.assertIsNotNone(pong_after, "no pong during the replay")
        self.assertLess(pong_after, 499)
