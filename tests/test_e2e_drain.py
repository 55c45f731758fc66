"""
End to end: moving clients between real gates over 127.0.0.1 with
C{POST /v1/reconnect} and C{POST /v1/drain} (PROTOCOL.md sections 2 and 5).

Both gates here run on the in-memory store, so a player cannot take its
mailbox from one to the other: the Python client's resume is refused on the
second gate and it logs in afresh there. What is shown is the moving itself;
resuming across gates needs the shared store (store.kind = redis).

Helpers: L{tests.e2e}; the child twistd of L{tests.test_e2e_shutdown}.
"""

import os
import sys

from twisted.internet import reactor
from twisted.internet.error import ProcessDone
from twisted.trial.unittest import TestCase

import tests.test_e2e_shutdown as child
from gate.client import GateClient
from gate.client.address import parse_address
from tests.e2e import (HTTP, TIMEOUT, Addresses, connect_raw, connect_tcp,
                       connect_ws, start_gate, until, within)


def gate_stopped(gate):
    """
    Whether C{gate} stopped by itself, all the way.
    """
    return gate._stopping is not None and gate._stopping.called


def reconnects(gate, reason):
    return gate.metrics.registry.get_sample_value(
        "mmogate_reconnects_total", {"reason": reason}) or 0


class DrainTests(TestCase):
    async def client(self, gate, transport, name):
        """
        A L{GateClient} logged in to C{gate}; C{(client, states)}.
        """
        host, port = gate.address(transport)
        addr = f"tcp://{host}:{port}" if transport == "tcp" \
            else f"ws://{host}:{port}/ws"
        states = []
        client = GateClient(reactor, addr, login={"name": name},
                            on_state=lambda state, info: states.append(state),
                            max_backoff=0.5, connect_timeout=TIMEOUT)
        self.addCleanup(lambda: within(client.close(), TIMEOUT,
                                       "the client to close"))
        await within(client.connect(), TIMEOUT, f"{name} to log in")
        return client, states

    async def test_drain_moves_everyone(self):
        """
        Every client ends on the second gate, each at the address for its
        transport; new connections are refused, C{/ready} and the
        registration say C{draining}, and the gate stops once empty.
        """
        a = start_gate(self, gate={"id": "gate-a"},
                       drain={"jitter": 0.5, "close_after": 5.0})
        b = start_gate(self, gate={"id": "gate-b"})
        clients = {}
        for n, transport in enumerate(("tcp", "tcp", "tcp", "ws", "ws")):
            clients[f"p{n}"] = (transport,) + await self.client(a, transport,
                                                                f"p{n}")
        raw = await connect_ws(self, a)
        await raw.login("raw")
        api, metrics = HTTP(self, a), HTTP(self, a, "metrics")
        self.assertEqual(await metrics.get("/ready"), (200, None, b"ready\n"))
        b_tcp = "127.0.0.1:%d" % b.address("tcp")[1]
        b_ws = "ws://127.0.0.1:%d/ws" % b.address("ws")[1]
        code, answer, _ = await api.post("/v1/drain", {
            "addr": b_tcp, "addrs": {"ws": b_ws}, "deadline": 30})
        self.assertEqual((code, answer), (200, {"draining": True}))

        code, _, body = await metrics.get("/ready")
        self.assertEqual((code, body), (503, b"not ready: draining\n"))
        await until(lambda: a.reference.gates["gate-a"]["state"]
                    == "draining", "the registration to say draining")
        refused = await connect_raw(self, a, "tcp")
        await refused.wait_lost()
        self.assertEqual(refused.data, b"")
        # A raw client sees the envelope itself, then goes.
        envelope = await raw.expect(lambda e: e["t"] == "reconnect")
        self.assertEqual(envelope, {"t": "reconnect", "addr": b_ws,
                                    "reason": "drain"})
        await raw.close()

        for name, (transport, client, states) in clients.items():
            # Resuming fails (no shared store): a fresh login there.
            await until(lambda: states[-1] == "logged_in"
                        and "migrating" in states,
                        f"{name} to be bound on the second gate")
            self.assertTrue(b.players.get(name).online)
            self.assertEqual(client.address,
                             parse_address(b_tcp if transport == "tcp"
                                           else b_ws))
            self.assertIn("migrating", states)
            self.assertEqual(await client.request("echo", name), name)
        await until(lambda: gate_stopped(a), "the drained gate to stop")
        self.assertEqual(a.reference.gates["gate-a"]["state"], "down")
        self.assertEqual(reconnects(a, "drain"), 6)
        self.assertEqual(a.metrics.registry.get_sample_value(
            "mmogate_gate_state", {"state": "down"}), 1)
        self.assertTrue(b.running)
        self.assertEqual(sorted(s.player_id for s in
                                b.sessions.sessions.values()),
                         sorted(clients))

    async def test_deadline(self):
        """
        A client that ignores C{reconnect} is kicked C{shutdown} at the
        deadline, when the gate stops.
        """
        a = start_gate(self, drain={"jitter": 0.0, "close_after": 60.0})
        stubborn = await connect_tcp(self, a)
        await stubborn.login("stubborn")
        api, metrics = HTTP(self, a), HTTP(self, a, "metrics")
        started = reactor.seconds()
        code, answer, _ = await api.post("/v1/drain", {"addr": "b:1",
                                                       "deadline": 1.0})
        self.assertEqual((code, answer), (200, {"draining": True}))
        envelope = await stubborn.next()
        self.assertEqual(envelope, {"t": "reconnect", "addr": "b:1",
                                    "reason": "drain"})
        self.assertEqual((await metrics.get("/ready"))[0], 503)
        # Still served meanwhile: heartbeats work, requests are refused.
        stubborn.send({"t": "ping", "ts": 1})
        self.assertEqual(await stubborn.next(), {"t": "pong", "ts": 1})
        answer = await stubborn.request({"t": "req", "route": "echo",
                                         "data": 1})
        self.assertEqual((answer["t"], answer["code"]), ("err", "busy"))
        # A second drain changes nothing.
        code, answer, _ = await api.post("/v1/drain", {"addr": "c:1"})
        self.assertEqual((code, answer), (200, {"draining": True}))
        kick = await stubborn.next(timeout=TIMEOUT + 1.0)
        self.assertEqual((kick["t"], kick["reason"]), ("kick", "shutdown"))
        self.assertGreaterEqual(reactor.seconds() - started, 0.9)
        await stubborn.wait_lost()
        await until(lambda: gate_stopped(a), "the gate to stop")
        stubborn.assert_nothing_pending()

    async def test_close_after(self):
        """
        A client still there C{drain.close_after} seconds after
        C{reconnect} is closed without more ado; the gate, then empty,
        stops long before its deadline.
        """
        a = start_gate(self, drain={"jitter": 0.0, "close_after": 0.3})
        stubborn = await connect_tcp(self, a)
        await stubborn.login("stubborn")
        api = HTTP(self, a)
        started = reactor.seconds()
        await api.post("/v1/drain", {"addr": "b:1", "deadline": 60})
        self.assertEqual((await stubborn.next())["t"], "reconnect")
        await stubborn.wait_lost()
        stubborn.assert_nothing_pending()
        self.assertGreaterEqual(reactor.seconds() - started, 0.25)
        await until(lambda: gate_stopped(a), "the empty gate to stop")
        self.assertLess(reactor.seconds() - started, 30)

    async def test_empty_gate_stops_at_once(self):
        a = start_gate(self)
        api = HTTP(self, a)
        code, answer, _ = await api.post("/v1/drain", {"addr": "b:1"})
        self.assertEqual((code, answer), (200, {"draining": True}))
        await until(lambda: gate_stopped(a), "the empty gate to stop")

    async def test_reconnect(self):
        """
        C{/v1/reconnect} moves one player, or everyone, without draining.
        """
        a = start_gate(self, drain={"jitter": 0.2})
        alice = await connect_tcp(self, a)
        await alice.login("alice")
        bob = await connect_ws(self, a)
        await bob.login("bob")
        api, metrics = HTTP(self, a), HTTP(self, a, "metrics")
        code, answer, _ = await api.post("/v1/reconnect", {
            "player_id": "alice", "addr": "b.example:8080"})
        self.assertEqual((code, answer), (200, {"sent": 1}))
        self.assertEqual(await alice.next(), {"t": "reconnect",
                                              "addr": "b.example:8080",
                                              "reason": "admin"})
        code, answer, _ = await api.post("/v1/reconnect", {
            "player_id": "nobody", "addr": "b.example:8080"})
        self.assertEqual((code, answer), (200, {"sent": 0}))
        code, answer, _ = await api.post("/v1/reconnect", {
            "player_id": "alice", "addr": "b.example:8080", "all": True})
        self.assertEqual(code, 400)
        self.assertEqual(answer["error"]["code"], "bad_request")
        # Everyone: alice is already on her way.
        code, answer, _ = await api.post("/v1/reconnect", {
            "all": True, "addr": "b.example:8080",
            "addrs": {"ws": "wss://b.example/ws"}})
        self.assertEqual((code, answer), (200, {"sent": 1}))
        self.assertEqual(await bob.next(), {"t": "reconnect",
                                            "addr": "wss://b.example/ws",
                                            "reason": "admin"})
        self.assertEqual(reconnects(a, "admin"), 2)
        # Not a drain: the gate stays ready and takes new clients.
        self.assertEqual((await metrics.get("/ready"))[0], 200)
        carol = await connect_tcp(self, a)
        await carol.login("carol")
        alice.assert_nothing_pending()


class TwistdDrainTests(TestCase):
    """
    A drained C{twistd mmogate} process exits 0, as after SIGTERM.
    """

    start_backend = child.TwistdShutdownTests.start_backend
    wait_healthy = child.TwistdShutdownTests.wait_healthy

    async def spawn_gate(self, backend_url):
        for attempt in (1, 2):
            ports = child.free_ports(4)
            path = os.path.abspath(self.mktemp() + ".toml")
            with open(path, "w") as f:
                f.write(child.config_toml(ports, backend_url)
                        + "\n[drain]\njitter = 10.0\n")
            process = child.TwistdProcess()
            reactor.spawnProcess(
                process, sys.executable,
                [sys.executable, "-c",
                 "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", "mmogate", "--config", path],
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                path=child.CHECKOUT)
            self.addCleanup(process.kill)
            if await self.wait_healthy(process, ports[3]):
                return process, ports
            await process.wait_ended(child.EXIT_TIMEOUT)
            if attempt == 2 or b"already in use" not in process.output:
                self.fail("twistd exited before /health answered:\n"
                          + process.output.decode("utf-8", "replace"))

    async def test_drained_process_exits_0(self):
        backend, backend_url = await self.start_backend()
        process, (tcp, ws, api_port, metrics_port) = \
            await self.spawn_gate(backend_url)
        gate = Addresses(tcp=tcp, ws=ws, api=api_port, metrics=metrics_port)
        client = await connect_tcp(self, gate)
        await client.login("alice")
        api = HTTP(self, gate)
        # The deadline bounds the jitter window: alice is told within 2 s.
        code, answer, _ = await api.post("/v1/drain", {"addr": "b:1",
                                                       "deadline": 2})
        self.assertEqual((code, answer), (200, {"draining": True}))
        await until(lambda: backend.gates["e2e-twistd"]["state"]
                    == "draining", "the registration to say draining")
        envelope = await client.next(timeout=TIMEOUT)
        self.assertEqual(envelope["t"], "reconnect")
        await client.close()
        reason = await process.wait_ended(child.EXIT_TIMEOUT)
        output = process.output.decode("utf-8", "replace")
        self.assertEqual(backend.gates["e2e-twistd"]["state"], "down")
        self.assertIn("drained (empty)", output)
        self.assertIn("gate e2e-twistd stopped", output)
        self.assertNotIn("Traceback", output)
        self.assertTrue(reason.check(ProcessDone),
                        f"twistd did not exit 0 after a drain: "
                        f"{reason.value}\n{output}")
