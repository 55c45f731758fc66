"""
End to end: stopping a gate. In-process (C{stopService}) and as an
operator does it: C{twistd -n mmogate --config FILE} in a child process,
stopped with SIGTERM. Clients are told C{kick} C{shutdown}, the backend
hears C{offline} for each player and C{down} for the gate, and the process
exits 0.

Helpers: L{tests.e2e}.
"""

import errno
import os
import socket
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (TCP4ClientEndpoint, connectProtocol,
                                        serverFromString)
from twisted.internet.error import ConnectionRefusedError, ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from backend.reference import ReferenceBackend
from tests.e2e import (API_KEY, AUTH_SECRET, HTTP, LOOPBACK, TIMEOUT,
                       Addresses, TCPClient, connect_tcp, connect_ws,
                       events_of, start_gate, until, within)

#: The checkout: the twistd plugin imports C{gate.tap} from here.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Bound on a child gate's start-up (interpreter, imports, binding).
START_TIMEOUT = 30.0

#: Bound on a child gate's exit after SIGTERM.
EXIT_TIMEOUT = 20.0


class InProcessShutdownTests(TestCase):
    async def test_stop_kicks_everyone(self):
        gate = start_gate(self)
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        bob = await connect_ws(self, gate)
        await bob.login("bob")
        anonymous = await connect_tcp(self, gate)
        tcp_address = gate.address("tcp")
        stopped = within(gate.stopService(), TIMEOUT, "the gate to stop")
        for client in (alice, bob, anonymous):
            kick = await client.next()
            self.assertEqual((kick["t"], kick["reason"]), ("kick", "shutdown"))
            self.assertIsInstance(kick["msg"], str)
            await client.wait_lost()
        await stopped
        for name in ("alice", "bob"):
            self.assertEqual([e["event"] for e in events_of(gate, name)],
                             ["online", "offline"])
        self.assertEqual(gate.reference.gates["e2e-gate"]["state"], "down")
        # The client listeners are closed.
        with self.assertRaises(ConnectionRefusedError):
            await within(connectProtocol(
                TCP4ClientEndpoint(reactor, *tcp_address, timeout=TIMEOUT),
                TCPClient()), TIMEOUT, "a refused connection")


# A gate in a child process.

def free_ports(n):
    """
    C{n} distinct loopback ports that were free a moment ago: bound to port
    0 together (so the OS picks distinct ones), read and closed.
    """
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TwistdProcess(ProcessProtocol):
    """
    A child twistd: its output collected; C{reason}, once it ended, the
    L{Failure} of L{ProcessDone} or L{ProcessTerminated} it ended with.
    """

    def __init__(self):
        self.output = b""
        self.reason = None
        self._ended = Deferred()

    @property
    def running(self):
        return self.reason is None

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.reason = reason
        self._ended.callback(None)

    async def wait_ended(self, timeout):
        """
        Wait for the child to exit; return C{reason}.
        """
        d = Deferred()
        self._ended.addCallback(lambda _: d.called or d.callback(None))
        await within(d, timeout, "the twistd process to exit; its output:\n"
                     + self.output.decode("utf-8", "replace"))
        return self.reason

    async def kill(self):
        """
        Cleanup: make sure the child is gone.
        """
        if self.running:
            self.transport.signalProcess("KILL")
        await self.wait_ended(EXIT_TIMEOUT)


class TrackingSite(Site):
    """
    A site that knows its open connections, so a test can wait for them to
    close before it ends.
    """

    noisy = False

    def __init__(self, resource):
        Site.__init__(self, resource)
        self.connections = set()

    def buildProtocol(self, addr):
        protocol = Site.buildProtocol(self, addr)
        lost = protocol.connectionLost

        def connectionLost(reason):
            self.connections.discard(protocol)
            return lost(reason)

        protocol.connectionLost = connectionLost
        self.connections.add(protocol)
        return protocol

    def log(self, request):
        pass


def config_toml(ports, backend_url):
    tcp, ws, api, metrics = ports
    return f"""
[gate]
id = "e2e-twistd"

[listen]
tcp = "tcp:{tcp}:interface=127.0.0.1"
ws = "tcp:{ws}:interface=127.0.0.1"
api = "tcp:{api}:interface=127.0.0.1"
metrics = "tcp:{metrics}:interface=127.0.0.1"

[backend]
url = "{backend_url}"
timeout = 5.0
register_interval = 0.0

[api]
key = "{API_KEY}"

[auth]
secret = "{AUTH_SECRET}"

[shutdown]
grace = 5.0
"""


class TwistdShutdownTests(TestCase):
    async def start_backend(self):
        """
        A reference backend in this process, for the child gate to talk to.
        """
        backend = ReferenceBackend(reactor, api_key=API_KEY)
        site = TrackingSite(backend.resource())
        port = await serverFromString(reactor, LOOPBACK).listen(site)

        async def stop():
            await port.stopListening()
            await backend.close()
            # The child's connections close when it exits.
            await until(lambda: not site.connections,
                        "the child gate's backend connections to close")

        self.addCleanup(stop)
        return backend, f"http://127.0.0.1:{port.getHost().port}"

    async def spawn_gate(self, backend_url):
        """
        Start a child gate and wait until its C{/health} answers; retry once
        with other ports if one was taken meanwhile.

        @return: C{(process, ports)}.
        """
        for attempt in (1, 2):
            ports = free_ports(4)
            path = os.path.abspath(self.mktemp() + ".toml")
            with open(path, "w") as f:
                f.write(config_toml(ports, backend_url))
            process = TwistdProcess()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            reactor.spawnProcess(
                process, sys.executable,
                [sys.executable, "-c",
                 "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", "mmogate", "--config", path],
                env=env, path=CHECKOUT)
            self.addCleanup(process.kill)
            if await self.wait_healthy(process, ports[3]):
                return process, ports
            await process.wait_ended(EXIT_TIMEOUT)
            output = process.output.decode("utf-8", "replace")
            if attempt == 1 and ("Address already in use" in output
                                 or os.strerror(errno.EADDRINUSE) in output):
                continue
            self.fail(f"twistd exited before /health answered:\n{output}")

    async def wait_healthy(self, process, metrics_port):
        """
        Whether C{/health} answered 200 before the process ended.
        """
        metrics = HTTP(self, Addresses(metrics=metrics_port), "metrics")

        async def healthy():
            if not process.running:
                return "ended"
            try:
                code, _, _ = await metrics.get("/health")
            except Exception:
                return False
            return code == 200 and "healthy"

        state = await until(healthy, "the child gate's /health to answer",
                            timeout=START_TIMEOUT, interval=0.05)
        return state == "healthy"

    async def test_sigterm(self):
        backend, backend_url = await self.start_backend()
        process, (tcp, ws, api, metrics) = await self.spawn_gate(backend_url)
        child = Addresses(tcp=tcp, ws=ws, api=api, metrics=metrics)
        alice = await connect_tcp(self, child)
        login = await alice.login("alice")
        self.assertEqual(login["player_id"], "alice")
        bob = await connect_ws(self, child)
        await bob.login("bob")
        for name in ("alice", "bob"):
            await until(lambda: events_of(backend, name, "online"),
                        f"{name}'s online event")
        self.assertEqual(backend.gates["e2e-twistd"]["state"], "up")

        process.transport.signalProcess("TERM")
        for client in (alice, bob):
            kick = await client.next()
            self.assertEqual((kick["t"], kick["reason"]), ("kick", "shutdown"))
            await client.wait_lost()
        reason = await process.wait_ended(EXIT_TIMEOUT)
        output = process.output.decode("utf-8", "replace")
        for name in ("alice", "bob"):
            offline = events_of(backend, name, "offline")
            self.assertEqual(len(offline), 1, (name, list(backend.events)))
            self.assertEqual(offline[0]["gate_id"], "e2e-twistd")
        self.assertEqual(backend.gates["e2e-twistd"]["state"], "down")
        self.assertIn("gate e2e-twistd stopping", output)
        self.assertIn("gate e2e-twistd stopped", output)
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)
        # Last, so that everything above is known to work when only this
        # fails: a graceful stop exits 0.
        self.assertTrue(reason.check(ProcessDone),
                        f"twistd did not exit 0 after a graceful stop: "
                        f"{reason.value}")
        self.assertEqual(reason.value.exitCode, 0, output)

