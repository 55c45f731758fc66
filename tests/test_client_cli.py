"""
Tests for L{gate.client.cli}: argument parsing, and runs against the
in-memory gate of L{tests.test_client} (and once over a real socket).
"""

import io
import json
import sys

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gate.client import Push, cli
from gate.client.errors import GateError
from tests.test_client import EchoGate, FakeEndpoints, listen_tcp_gate


class ParseTests(SynchronousTestCase):
    def setUp(self):
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def test_name(self):
        args = cli.parse_args(["tcp://h:1", "--name", "bob", "--send", "echo",
                               '{"a": 1}', "--send", "ping", "null"])
        self.assertEqual(args.login, {"name": "bob"})
        self.assertIsNone(args.token)
        self.assertEqual(args.send, [("echo", {"a": 1}), ("ping", None)])
        self.assertFalse(args.watch)

    def test_login_and_token(self):
        args = cli.parse_args(["h:1", "--login", '{"user": "u", "pw": "p"}',
                               "--watch", "--json"])
        self.assertEqual(args.login, {"user": "u", "pw": "p"})
        self.assertTrue(args.watch and args.json)
        args = cli.parse_args(["h:1", "--token", "abc.def.ghi"])
        self.assertEqual((args.login, args.token), (None, "abc.def.ghi"))

    def test_errors(self):
        for argv in [["h:1"], ["h:1", "--name", "a", "--token", "t"],
                     ["h:1", "--login", "{nope"],
                     ["h:1", "--name", "a", "--send", "echo", "{bad"],
                     ["h:1", "--name", "a", "--send", "echo"]]:
            e = self.assertRaises(SystemExit, cli.parse_args, argv)
            self.assertEqual(e.code, 2, argv)

    def test_main_bad_arguments(self):
        self.assertEqual(self.assertRaises(SystemExit, cli.main, []).code, 2)


class PrinterTests(SynchronousTestCase):
    def test_human(self):
        out, err = [], []
        p = cli.Printer(out.append, err.append)
        p.resp({"player_id": "bob", "last_seq": 3, "data": {"a": 1}})
        p.reply("echo", [1])
        p.failure("buy", GateError("busy", "later"))
        p.push(Push("chat", "hi", 1.0, 4))
        p.push(Push("tick", None, 1.0, None))
        p.gap(2, 3)
        self.assertEqual(out, ['bound as bob (last_seq 3): {"a":1}\n',
                               "echo -> [1]\n",
                               'push chat #4: "hi"\n',
                               "push tick: null\n",
                               "gap: pushes 2..3 were lost\n"])
        self.assertEqual(err, ["buy failed: busy: later\n"])

    def test_json(self):
        out, err = [], []
        p = cli.Printer(out.append, err.append, as_json=True)
        p.resp({"player_id": "bob", "last_seq": 0, "data": None})
        p.failure("buy", GateError("busy", "later"))
        p.push(Push("chat", "é", 1.0, 4))
        p.kick("admin", "bye")
        self.assertEqual([json.loads(line) for line in out], [
            {"t": "resp", "player_id": "bob", "last_seq": 0, "data": None},
            {"t": "err", "route": "buy", "code": "busy", "msg": "later"},
            {"t": "push", "route": "chat", "data": "é", "ts": 1.0, "seq": 4},
        ])
        self.assertEqual(json.loads(err[0]),
                         {"t": "kick", "reason": "admin", "msg": "bye"})


class RunTests(SynchronousTestCase):
    """
    Whole runs of the tool, the gate played in memory.
    """

    def start(self, *argv, mode="accept"):
        self.endpoints = FakeEndpoints()
        self.endpoints.mode = mode
        self.out, self.err = [], []
        self.stdio = []

        def stdio(protocol):
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.stdio.append((protocol, transport))

        args = cli.parse_args(["tcp://gate:1"] + list(argv))
        return Deferred.fromCoroutine(cli.run(
            MemoryReactorClock(), args, self.out.append, self.err.append,
            stdio, endpoint_factory=self.endpoints, clock=Clock()))

    def answer(self, reply=lambda env: {"t": "resp", "id": env["id"],
                                        "data": env["data"]}):
        gate = self.endpoints.gate
        for env in gate.received():
            if env["t"] == "login":
                gate.send({"t": "resp", "id": env["id"], "data": "hi",
                           "player_id": env["data"]["name"],
                           "resume_token": "rt", "last_seq": 0})
            elif env["t"] == "req":
                gate.send(reply(env))

    def test_sends(self):
        d = self.start("--name", "bob", "--send", "echo", '{"a": 1}',
                       "--send", "nope", "2")
        self.answer()
        self.answer()
        gate = self.endpoints.gate
        (req,) = gate.received()
        self.assertEqual(req["route"], "nope")
        gate.send({"t": "err", "id": req["id"], "code": "route_not_found",
                   "msg": "nope"})
        self.assertTrue(gate.closing)
        gate.lose(ConnectionDone)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(self.out, ['bound as bob (last_seq 0): "hi"\n',
                                    'echo -> {"a":1}\n'])
        self.assertIn("nope failed: route_not_found: nope\n", self.err)

    def test_connect_refused(self):
        d = self.start("--name", "bob", mode="refuse")
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(self.out, [])
        self.assertTrue(self.err[-1].startswith("error: connect_failed: "))

    def test_login_refused(self):
        d = self.start("--token", "t")
        gate = self.endpoints.gate
        (auth,) = gate.received()
        gate.send({"t": "err", "id": auth["id"], "code": "auth_failed",
                   "msg": "bad token"})
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(self.err[-1], "error: auth_failed: bad token\n")

    def test_bad_ca_file(self):
        err = []
        args = cli.parse_args(["tls://gate:1", "--name", "b",
                               "--ca-file", "/nonexistent/ca.pem"])
        d = Deferred.fromCoroutine(cli.run(MemoryReactorClock(), args,
                                           err.append, err.append))
        self.assertEqual(self.successResultOf(d), 2)
        self.assertIn("ca.pem", err[0])

    def test_interactive(self):
        """
        Without --send or --watch, input lines are requests; replies still
        come after the input ends, then the tool exits.
        """
        d = self.start("--name", "bob", "--json")
        self.answer()
        [(lines, stdout)] = self.stdio
        lines.dataReceived(b'echo {"x": 1}\n\n# comment\r\nbad {\nping\n')
        lines.readConnectionLost()
        self.assertNoResult(d)
        self.endpoints.gate.send({"t": "push", "route": "chat", "data": 1,
                                  "ts": 2.0})
        self.answer()
        self.assertTrue(self.endpoints.gate.closing)
        self.endpoints.gate.lose(ConnectionDone)
        self.assertTrue(stdout.disconnecting)
        lines.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(d), 0)
        printed = [json.loads(x) for x in stdout.value().splitlines()]
        self.assertEqual(printed, [
            {"t": "push", "route": "chat", "data": 1, "ts": 2.0, "seq": None},
            {"t": "reply", "route": "echo", "data": {"x": 1}},
            {"t": "reply", "route": "ping", "data": None},
        ])
        self.assertEqual(json.loads(self.out[0])["t"], "resp")
        self.assertTrue(any("not JSON" in e for e in self.err))

    def test_watch_until_kicked(self):
        d = self.start("--name", "bob", "--watch")
        self.answer()
        [(lines, stdout)] = self.stdio
        lines.dataReceived(b"echo 1\n")  # ignored when watching
        gate = self.endpoints.gate
        self.assertEqual(gate.received(), [])
        gate.send({"t": "push", "route": "chat", "data": "x", "ts": 1.0,
                   "seq": 1})
        gate.send({"t": "kick", "reason": "admin", "msg": "banned"})
        gate.lose(ConnectionDone)
        lines.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(stdout.value(), b'push chat #1: "x"\n')
        self.assertIn("kicked: admin: banned\n", self.err)

    def test_watch_until_eof(self):
        d = self.start("--name", "bob", "--send", "echo", "1", "--watch")
        self.answer()
        self.answer()
        [(lines, stdout)] = self.stdio
        lines.readConnectionLost()
        self.endpoints.gate.lose(ConnectionDone)
        lines.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.out[-1], "echo -> 1\n")


class RealSocketRunTests(TestCase):
    timeout = 20

    async def test_send(self):
        gate = EchoGate()
        port = listen_tcp_gate(gate)
        self.addCleanup(port.stopListening)
        out, err = [], []
        args = cli.parse_args([f"tcp://127.0.0.1:{port.getHost().port}",
                               "--name", "carol", "--json",
                               "--send", "echo", '{"n": 1}'])
        status = await cli.run(global_reactor, args, out.append, err.append)
        self.assertEqual(status, 0)
        lines = [json.loads(line) for line in out]
        self.assertEqual(lines[0]["player_id"], "carol")
        self.assertIn({"t": "reply", "route": "echo", "data": {"n": 1}}, lines)
        for conn in gate.connections:
            await conn.lost
