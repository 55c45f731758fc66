"""
Tests for L{gate.ctl} (C{mmogatectl}): its formatting and argument checks
in memory, then every command against a real gate over 127.0.0.1 (tables
and C{--json}), its error paths (refused key, unknown player, unreachable
API, a server that does not answer, answers that are not the API's), and
C{python -m gate.ctl} in a child process.

The CLI is synchronous (urllib): here it runs in a thread while the
reactor serves the gate.
"""

import io
import json
import os
import shutil
import sys
from contextlib import redirect_stderr

from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from gate import ctl
from gate.metrics import Metrics
from gate.player import PushResult
from tests.e2e import (API_KEY, LOOPBACK, TIMEOUT, closed_port, connect_tcp,
                       connect_ws, start_gate, until, within)

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, environ=None):
    """
    C{main(argv)} in this thread: C{(status, stdout, stderr)}.
    """
    out, err = io.StringIO(), io.StringIO()
    with redirect_stderr(err):
        status = ctl.main(argv, out, err, environ or {})
    return status, out.getvalue(), err.getvalue()


class FormattingTests(SynchronousTestCase):
    def test_table(self):
        self.assertEqual(ctl.table(("A", "LONGER", "C"),
                                   [("xxxx", None, True), ("y", 1.0, "z")]),
                         ["A     LONGER  C",
                          "xxxx  -       yes",
                          "y     1       z"])

    def test_pairs(self):
        self.assertEqual(ctl.pairs([("online", False), ("mailbox", 3),
                                    ("x", {"a": 1})]),
                         ["online   no", "mailbox  3", 'x        {"a":1}'])

    def test_age(self):
        self.assertEqual([ctl.age(s) for s in (-1, 59, 61, 3600, 90061)],
                         ["0s", "59s", "1m01s", "1h00m", "1d01h"])

    def test_utc(self):
        self.assertEqual(ctl.utc(0), "1970-01-01 00:00:00")
        self.assertEqual(ctl.utc("x"), "x")

    def test_summarise(self):
        """
        The figures of C{stats} come from the gate's own metric names.
        """
        metrics = Metrics("g")
        metrics.session_opened("tcp")
        metrics.session_opened("tcp")
        metrics.session_opened("ws")
        metrics.players(2, 5)
        metrics.request("echo", "ok", 0.01)
        metrics.request("echo", "ok", 0.01)
        metrics.request("echo", "backend_timeout", 1)
        metrics.request("other", "backend_error", 1)
        result = PushResult()
        result.delivered, result.queued = 4, 1
        metrics.pushed(result)
        metrics.state("draining")
        metrics.reconnect_sent("drain")
        metrics.kicked("admin")
        metrics.pool(8, 1, 0)
        text = generate_latest(metrics.registry).decode()
        summary = ctl.summarise(ctl.samples(text))
        self.assertEqual(summary["state"], "draining")
        self.assertEqual(summary["sessions"], {"tcp": 2, "ws": 1})
        self.assertEqual(summary["players"], {"offline": 5, "online": 2})
        self.assertEqual(summary["requests"]["total"], 4)
        self.assertEqual(summary["requests"]["by_outcome"]["ok"], 2)
        self.assertEqual(summary["backend_errors"],
                         {"backend_unavailable": 0, "backend_timeout": 1,
                          "backend_error": 1})
        self.assertEqual(summary["pushes"], {"delivered": 4, "dropped": 0,
                                             "queued": 1, "unknown": 0})
        self.assertEqual(summary["reconnects"], {"drain": 1})
        self.assertEqual(summary["kicks"], {"admin": 1})
        self.assertEqual(summary["workers"],
                         {"size": 8, "busy": 1, "queue": 0})

    def test_not_prometheus(self):
        with self.assertRaises(ctl.CtlError) as e:
            ctl.samples("this is { not metrics\n")
        self.assertEqual(e.exception.status, ctl.EXIT_UNREACHABLE)


class UsageTests(SynchronousTestCase):
    def assertUsage(self, argv, words):
        status, out, err = run(argv)
        self.assertEqual((status, out), (ctl.EXIT_USAGE, ""), err)
        self.assertIn(words, err)

    def test_usage_errors(self):
        self.assertUsage([], "COMMAND")
        self.assertUsage(["nope"], "invalid choice")
        self.assertUsage(["player"], "ID")
        self.assertUsage(["reconnect", "--addr", "b:1"], "player ID or --all")
        self.assertUsage(["reconnect", "alice", "--all", "--addr", "b:1"],
                         "player ID or --all")
        self.assertUsage(["reconnect", "alice"], "--addr")
        self.assertUsage(["drain", "--addr", "b:1", "--deadline", "-1"],
                         ">= 0")
        self.assertUsage(["drain", "--addr", "b:1", "--addr-for", "ws"],
                         "TRANSPORT=ADDR")
        self.assertUsage(["push", "a", "--route", "r", "--data", "{x"],
                         "not JSON")
        self.assertUsage(["push", "--route", "r"], "ID")
        self.assertUsage(["kick", "a", "--ban", "soon"], "not a number")
        self.assertUsage(["history", "--limit", "0"], "1 or more")

    def test_bad_api_url(self):
        status, out, err = run(["--api", "localhost:8090", "sessions"])
        self.assertEqual(status, ctl.EXIT_USAGE)
        self.assertIn("bad URL", err)

    def test_unreachable(self):
        port = closed_port()
        status, out, err = run(["--api", f"http://127.0.0.1:{port}",
                                "sessions"])
        self.assertEqual((status, out), (ctl.EXIT_UNREACHABLE, ""))
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(f"mmogatectl: cannot reach the API at "
                      f"http://127.0.0.1:{port}", err)
        status, out, err = run(["--metrics", f"http://127.0.0.1:{port}",
                                "stats"])
        self.assertEqual(status, ctl.EXIT_UNREACHABLE)
        self.assertIn("cannot reach the metrics listener", err)


class Scripted(Resource):
    """
    A stand-in API: records each request, answers with the next of
    C{answers} (C{(status, body)}; C{None} never answers).
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.requests = []
        self.answers = []
        self.unanswered = []

    def render(self, request):
        self.requests.append({
            "method": request.method.decode(), "uri": request.uri.decode(),
            "authorization": request.getHeader("authorization"),
            "body": json.loads(request.content.read() or b"null")})
        answer = self.answers.pop(0) if self.answers else (200, b"{}")
        if answer is None:
            # Ends (with ConnectionDone) when the client hangs up.
            self.unanswered.append(request.notifyFinish().addErrback(
                lambda failure: failure.value))
            return NOT_DONE_YET
        status, body = answer
        request.setResponseCode(status)
        return body


class GateTests(TestCase):
    """
    Each command against a real gate.
    """

    async def ctl(self, *argv, key=API_KEY, environ=None):
        """
        Run C{mmogatectl} against the gate of this test in a thread.
        """
        base = []
        if key is not None:
            base += ["--key", key]
        base += ["--api", self.api_url, "--metrics", self.metrics_url]
        out, err = io.StringIO(), io.StringIO()
        status = await within(deferToThread(ctl.main, base + list(argv), out,
                                            err, environ or {}),
                              TIMEOUT, f"mmogatectl {' '.join(argv)}")
        return status, out.getvalue(), err.getvalue()

    async def ok(self, *argv):
        status, out, err = await self.ctl(*argv)
        self.assertEqual((status, err), (0, ""), out)
        return out

    async def json(self, *argv):
        return json.loads(await self.ok("--json", *argv))

    async def setup_gate(self, **sections):
        self.gate = start_gate(self, **sections)
        host, port = self.gate.address("api")
        self.api_url = f"http://{host}:{port}"
        host, port = self.gate.address("metrics")
        self.metrics_url = f"http://{host}:{port}"
        self.alice = await connect_tcp(self, self.gate)
        await self.alice.login("alice")
        self.bob = await connect_ws(self, self.gate)
        await self.bob.login("bob")

    async def test_sessions(self):
        await self.setup_gate()
        out = await self.ok("sessions")
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["SESSION", "PLAYER", "TRANSPORT",
                                            "PEER", "SINCE", "(UTC)", "AGE"])
        self.assertEqual(sorted(line.split()[1:3] for line in lines[1:3]),
                         [["alice", "tcp"], ["bob", "ws"]])
        self.assertEqual(lines[-1], "2 sessions")
        # Aligned: every column starts where its header does.
        start = lines[0].index("PLAYER")
        self.assertTrue(all(line[start - 2:start] == "  "
                            for line in lines[1:3]))
        answer = await self.json("sessions")
        self.assertEqual(sorted(s["player_id"] for s in answer["sessions"]),
                         ["alice", "bob"])
        # --json also after the command.
        self.assertEqual(await self.json("sessions"),
                         json.loads(await self.ok("sessions", "--json")))

    async def test_player(self):
        await self.setup_gate()
        out = await self.ok("player", "alice")
        self.assertEqual(out.splitlines()[:3],
                         ["player_id   alice", "online      yes",
                          "gate_id     e2e-gate"])
        answer = await self.json("player", "alice")
        self.assertEqual((answer["player_id"], answer["online"]),
                         ("alice", True))
        status, out, err = await self.ctl("player", "nobody")
        self.assertEqual((status, out), (ctl.EXIT_API, ""))
        self.assertEqual(err, "mmogatectl: GET /v1/players/nobody: 404 "
                              "not_found: no such player\n")

    async def test_push(self):
        await self.setup_gate()
        out = await self.ok("push", "alice", "bob", "ghost", "--route",
                            "news", "--data", '{"text": "hi"}')
        self.assertEqual(out.splitlines(), ["delivered  2", "queued     0",
                                            "dropped    0",
                                            "unknown    ghost"])
        for client in (self.alice, self.bob):
            push = await client.expect(lambda e: e["t"] == "push")
            self.assertEqual((push["route"], push["data"], push["seq"]),
                             ("news", {"text": "hi"}, 1))
        answer = await self.json("push", "alice", "--route", "fx",
                                 "--transient")
        self.assertEqual(answer, {"delivered": 1, "queued": 0, "dropped": 0,
                                  "unknown": []})
        push = await self.alice.expect(lambda e: e["t"] == "push")
        self.assertEqual((push["route"], push["data"], "seq" in push),
                         ("fx", None, False))

    async def test_kick(self):
        await self.setup_gate()
        out = await self.ok("kick", "bob", "--reason", "cheating")
        self.assertEqual(out, "kicked bob\n")
        kick = await self.bob.expect(lambda e: e["t"] == "kick")
        self.assertEqual((kick["reason"], kick["msg"]), ("admin", "cheating"))
        self.assertEqual(await self.json("kick", "nobody"),
                         {"kicked": False})
        out = await self.ok("kick", "nobody")
        self.assertEqual(out, "nobody has no session on this gate: nobody "
                              "kicked\n")

    async def test_reconnect(self):
        await self.setup_gate(drain={"jitter": 0.0})
        out = await self.ok("reconnect", "alice", "--addr", "b.example:1")
        self.assertEqual(out, "reconnect to b.example:1: 1 session\n")
        self.assertEqual(await self.alice.expect(
            lambda e: e["t"] == "reconnect"),
            {"t": "reconnect", "addr": "b.example:1", "reason": "admin"})
        self.assertEqual(await self.json("reconnect", "nobody", "--addr",
                                         "b:1"), {"sent": 0})
        answer = await self.json("reconnect", "--all", "--addr", "b:1",
                                 "--addr-for", "ws=wss://b.example/ws")
        self.assertEqual(answer, {"sent": 1})
        envelope = await self.bob.expect(lambda e: e["t"] == "reconnect")
        self.assertEqual(envelope["addr"], "wss://b.example/ws")
        status, out, err = await self.ctl("reconnect", "alice", "--addr",
                                          "http://b/")
        self.assertEqual((status, out), (ctl.EXIT_API, ""))
        self.assertTrue(err.startswith("mmogatectl: POST /v1/reconnect: 400 "
                                       "bad_request: 'addr' must be"), err)

    async def test_drain(self):
        await self.setup_gate(drain={"jitter": 0.0, "close_after": 60.0})
        out = await self.ok("drain", "--addr", "b:1", "--deadline", "30")
        self.assertEqual(out, "draining to b:1: new clients are refused; the "
                              "gate stops once empty or after 30 s\n")
        for client in (self.alice, self.bob):
            envelope = await client.expect(lambda e: e["t"] == "reconnect")
            self.assertEqual(envelope["reason"], "drain")
        self.assertEqual(await self.json("drain", "--addr", "c:1"),
                         {"draining": True})
        stats = await self.json("stats")
        self.assertEqual(stats["state"], "draining")
        self.assertEqual(stats["reconnects"], {"drain": 2})
        await self.alice.close()
        await self.bob.close()
        await until(lambda: self.gate._stopping is not None
                    and self.gate._stopping.called,
                    "the drained gate to stop")
        status, out, err = await self.ctl("sessions")
        self.assertEqual(status, ctl.EXIT_UNREACHABLE)
        self.assertIn("cannot reach the API", err)

    async def test_stats(self):
        await self.setup_gate()
        await self.alice.request({"t": "req", "route": "echo", "data": 1})
        await self.alice.request({"t": "req", "route": "fail", "data": 1})
        out = await self.ok("stats")
        lines = dict(line.split("  ", 1) for line in out.splitlines())
        lines = {k.strip(): v.strip() for k, v in lines.items()}
        self.assertEqual(lines["gate state"], "up")
        self.assertEqual(lines["sessions"], "tcp 1, ws 1 (total 2)")
        self.assertEqual(lines["players"], "offline 0, online 2")
        self.assertIn("(ok 3, errors 1)", lines["requests"])
        self.assertEqual(lines["backend errors"],
                         "backend_unavailable 0, backend_timeout 0, "
                         "backend_error 1")
        stats = await self.json("stats")
        self.assertEqual(stats["sessions"], {"tcp": 1, "ws": 1})

    async def test_history(self):
        """
        The gate's audit log of one player, newest first, as a table.
        """
        await self.setup_gate()
        out = await self.ok("history", "--player", "alice", "--limit", "5")
        lines = out.splitlines()
        header = lines[0].split()
        self.assertEqual(header[:4], ["TS", "EVENT", "PLAYER_ID",
                                      "SESSION_ID"])
        events = [line.split()[2] for line in lines[1:-1]]
        self.assertIn("login", events)
        self.assertTrue(all(line.split()[3] == "alice"
                            for line in lines[1:-1]
                            if line.split()[2] == "login"), out)
        self.assertEqual(lines[-1], f"{len(events)} record"
                                    f"{'s' if len(events) != 1 else ''}")
        answer = await self.json("history", "--session", "nope")
        self.assertEqual(answer, {"events": []})
        status, out, err = await self.ctl("history", "--player", "x" * 300)
        self.assertEqual((status, out), (ctl.EXIT_API, ""))
        self.assertTrue(err.startswith("mmogatectl: GET /v1/history: 400 "
                                       "bad_request: "), err)

    async def test_keys(self):
        await self.setup_gate()
        status, out, err = await self.ctl("sessions", key="wrong")
        self.assertEqual((status, out), (ctl.EXIT_API, ""))
        self.assertIn("401 unauthorized", err)
        # From the environment when --key is not given.
        status, out, err = await self.ctl(
            "sessions", key=None, environ={"MMOGATE_API_KEY": API_KEY})
        self.assertEqual(status, 0, err)
        status, out, err = await self.ctl("sessions", key=None)
        self.assertIn("401 unauthorized", err)

    async def test_python_m(self):
        await self.setup_gate()
        out, err, status = await within(getProcessOutputAndValue(
            sys.executable,
            ["-m", "gate.ctl", "--api", self.api_url, "--key", API_KEY,
             "sessions", "--json"], env=dict(os.environ), path=CHECKOUT),
            30, "python -m gate.ctl")
        self.assertEqual(status, 0, err)
        self.assertEqual(len(json.loads(out)["sessions"]), 2)

    async def test_console_script(self):
        script = shutil.which("mmogatectl")
        if script is None:
            self.skipTest("mmogatectl is not installed (pip install .)")
        await self.setup_gate()
        out, err, status = await within(getProcessOutputAndValue(
            script, ["--api", self.api_url, "--key", API_KEY, "player",
                     "bob"], env=dict(os.environ)), 30, "mmogatectl")
        self.assertEqual(status, 0, err)
        self.assertIn(b"online      yes", out)


class ScriptedAPITests(TestCase):
    """
    What the CLI sends, and how it takes answers that are not the gate's.
    """

    async def setUp(self):
        self.api = Scripted()
        site = Site(self.api)
        site.log = lambda request: None
        port = await serverFromString(reactor, LOOPBACK).listen(site)
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    async def ctl(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        status = await within(deferToThread(
            ctl.main, ["--api", self.url, "--key", "k"] + list(argv), out,
            err, {}), TIMEOUT, f"mmogatectl {' '.join(argv)}")
        return status, out.getvalue(), err.getvalue()

    async def test_bodies(self):
        self.api.answers = [(200, b'{"kicked": true}')] * 2 + [
            (200, b'{"sent": 3}'), (200, b'{"draining": true}'),
            (200, b'{"draining": true}')]
        for argv in (["kick", "p/1", "--ban", "3600"],
                     ["kick", "p", "--reason", "x", "--ban", "1.5"],
                     ["reconnect", "--all", "--addr", "b:1", "--addr-for",
                      "ws=ws://b:2/ws", "--addr-for", "tcp+enc=b:3"],
                     ["drain", "--addr", "b:1", "--deadline", "0"],
                     ["drain", "--addr", "b:1"]):
            status, out, err = await self.ctl(*argv)
            self.assertEqual(status, 0, err)
        self.assertEqual([(r["method"], r["uri"], r["authorization"],
                           r["body"]) for r in self.api.requests], [
            ("POST", "/v1/kick", "Bearer k",
             {"player_id": "p/1", "ban_seconds": 3600}),
            ("POST", "/v1/kick", "Bearer k",
             {"player_id": "p", "reason": "x", "ban_seconds": 1.5}),
            ("POST", "/v1/reconnect", "Bearer k",
             {"addr": "b:1", "addrs": {"ws": "ws://b:2/ws", "tcp+enc": "b:3"},
              "all": True}),
            ("POST", "/v1/drain", "Bearer k", {"addr": "b:1",
                                                "deadline": 0}),
            ("POST", "/v1/drain", "Bearer k", {"addr": "b:1"})])

    async def test_player_id_quoted(self):
        self.api.answers = [(200, b'{"player_id": "a/b c"}')]
        status, out, err = await self.ctl("player", "a/b c")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.api.requests[0]["uri"], "/v1/players/a%2Fb%20c")

    async def test_history(self):
        self.api.answers = [(200, json.dumps({"history": [
            {"ts": 0, "event": "login", "player_id": "alice",
             "session_id": "s1", "gate_id": "g", "peer": "1.2.3.4:5",
             "extra": None},
            {"ts": 60.5, "event": "kick", "player_id": "alice",
             "session_id": "s1", "gate_id": "g", "reason": "admin"}]}
        ).encode())]
        status, out, err = await self.ctl("history", "--player", "alice",
                                          "--session", "s1", "--limit", "2")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.api.requests[0]["uri"],
                         "/v1/history?player_id=alice&session_id=s1&limit=2")
        lines = out.splitlines()
        self.assertEqual(lines[0].split(),
                         ["TS", "EVENT", "PLAYER_ID", "SESSION_ID", "GATE_ID",
                          "PEER", "REASON", "EXTRA"])
        self.assertEqual(lines[1].split(),
                         ["1970-01-01", "00:00:00", "login", "alice", "s1",
                          "g", "1.2.3.4:5", "-", "-"])
        self.assertEqual(lines[2].split()[2:4], ["kick", "alice"])
        self.assertEqual(lines[-1], "2 records")

    async def test_answers_not_the_apis(self):
        self.api.answers = [(500, b"<html>oops</html>"), (200, b"not json"),
                            (200, b"[1, 2]"), (404, b"")]
        status, out, err = await self.ctl("sessions")
        self.assertEqual((status, err), (ctl.EXIT_API, "mmogatectl: GET "
                         "/v1/sessions: 500 <html>oops</html>\n"))
        status, out, err = await self.ctl("sessions")
        self.assertEqual(status, ctl.EXIT_UNREACHABLE)
        self.assertIn("not JSON", err)
        status, out, err = await self.ctl("sessions")
        self.assertEqual(status, ctl.EXIT_UNREACHABLE)
        self.assertIn("is not a JSON object", err)
        status, out, err = await self.ctl("history")
        self.assertEqual((status, err), (ctl.EXIT_API, "mmogatectl: GET "
                         "/v1/history: 404 (no body)\n"))

    async def test_no_answer(self):
        self.api.answers = [None]
        status, out, err = await self.ctl("--timeout", "0.3", "sessions")
        self.assertEqual((status, out), (ctl.EXIT_UNREACHABLE, ""))
        self.assertIn("timed out", err)
        # The client has gone: the server's request ends too.
        await within(self.api.unanswered[0], TIMEOUT,
                     "the unanswered request to end")
