"""
End to end: TLS on every listener (PROTOCOL.md section 1, "TLS variants":
a Twisted C{ssl:} endpoint string). A real gate listens with certificates
made at test time (L{tests.certs}); the Python client connects over
C{tls://} and C{wss://}, verifying the certificate and the host name
against a pinned CA; the push API and the metrics listener answer over
HTTPS. Clients that do not trust the CA, that expect another name, or that
speak plain TCP to a TLS port are refused without harm to the gate.

Helpers: L{tests.e2e}.
"""

import json
import struct

from OpenSSL.SSL import Error as TLSError
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (TCP4ClientEndpoint, connectProtocol,
                                        wrapClientTLS)
from twisted.internet.ssl import optionsForClientTLS
from twisted.trial.unittest import TestCase
from twisted.web.client import (Agent, BrowserLikePolicyForHTTPS,
                                ResponseNeverReceived)

from gate.client import GateClient, GateError
from gate.client.address import load_trust_root
from tests.certs import make_pki
from tests.e2e import (API_KEY, HTTP, STOP_TIMEOUT, TIMEOUT, RawClient,
                       start_gate, until, within)


class HTTPS(HTTP):
    """
    L{HTTP} over TLS, trusting the CA in C{ca_file} (or only the
    platform's trust store when C{None}).
    """

    def __init__(self, test, gate, listener="api", ca_file=None,
                 key=API_KEY):
        HTTP.__init__(self, test, gate, listener, key)
        self.base = "https" + self.base[len("http"):]
        trust = load_trust_root(ca_file) if ca_file else None
        self.agent = Agent(reactor, BrowserLikePolicyForHTTPS(trust),
                           pool=self.pool)


def tls_gate(test, pki, **sections):
    """
    A gate with every listener on TLS with C{pki}'s certificate.
    """
    endpoint = pki.endpoint()
    return start_gate(test, listen={"tcp": endpoint, "ws": endpoint,
                                    "api": endpoint, "metrics": endpoint},
                      **sections)


def address(gate, scheme, host="127.0.0.1"):
    _, port = gate.address("ws" if scheme == "wss" else "tcp")
    return f"{scheme}://{host}:{port}" + ("/ws" if scheme == "wss" else "")


class TLSListenerTests(TestCase):
    def setUp(self):
        self.pki = make_pki(self.mktemp())

    async def client(self, gate, scheme, name, **kw):
        """
        A L{GateClient} bound as C{name}, closed on cleanup.
        """
        pushes = []
        got = Deferred()

        def on_push(push):
            pushes.append(push)
            if not got.called:
                got.callback(push)

        client = GateClient(reactor, address(gate, scheme),
                            login={"name": name}, on_push=on_push,
                            ping_interval=60, reconnect=False,
                            connect_timeout=TIMEOUT, **kw)
        self.addCleanup(lambda: within(client.close(), STOP_TIMEOUT,
                                       f"the {scheme} client to close"))
        resp = await within(client.connect(), TIMEOUT, f"a {scheme} login")
        self.assertEqual(resp["player_id"], name)
        client.first_push = got
        return client

    async def refused(self, gate, scheme, host="127.0.0.1", **kw):
        """
        Assert that a client for C{scheme} cannot connect.
        """
        client = GateClient(reactor, address(gate, scheme, host),
                            login={"name": "nobody"}, reconnect=False,
                            connect_timeout=TIMEOUT, **kw)
        with self.assertRaises(GateError) as cm:
            await within(client.connect(), 2 * TIMEOUT,
                         f"a refused {scheme} connection")
        self.assertEqual(cm.exception.code, "connect_failed")

    async def no_sessions(self, gate):
        await until(lambda: not gate.sessions.sessions,
                    "the gate to drop the refused connections' sessions")

    def test_announced_addresses(self):
        """
        Backends are told the TLS schemes of TLS listeners.
        """
        gate = tls_gate(self, self.pki)
        api_url, listen = gate.describe()
        self.assertTrue(api_url.startswith("https://"), api_url)
        self.assertEqual([a.split("://")[0] for a in listen], ["tls", "wss"])

    async def test_clients_api_and_metrics(self):
        """
        C{tls://} and C{wss://} clients pinning the CA log in and echo;
        the API over HTTPS lists their sessions as C{tcp+tls} and
        C{ws+tls} and pushes to them; metrics answer over HTTPS.
        """
        gate = tls_gate(self, self.pki)
        api = HTTPS(self, gate, ca_file=self.pki.ca_file)
        clients = {}
        for scheme, name in (("tls", "alice"), ("wss", "bob")):
            client = clients[name] = await self.client(
                gate, scheme, name, ca_file=self.pki.ca_file)
            self.assertEqual(await client.request("echo", {"over": scheme}),
                             {"over": scheme})
        code, answer, raw = await api.get("/v1/sessions")
        self.assertEqual(code, 200, raw)
        self.assertEqual(sorted((s["player_id"], s["transport"])
                                for s in answer["sessions"]),
                         [("alice", "tcp+tls"), ("bob", "ws+tls")])
        answer = await api.push(["alice", "bob"], "news", {"tls": True})
        self.assertEqual(answer["delivered"], 2, answer)
        for client in clients.values():
            push = await within(client.first_push, TIMEOUT, "a push")
            self.assertEqual((push.route, push.data), ("news", {"tls": True}))
        metrics = HTTPS(self, gate, "metrics", ca_file=self.pki.ca_file)
        code, _, raw = await metrics.get("/health")
        self.assertEqual((code, raw), (200, b"ok\n"))
        code, _, raw = await metrics.get("/metrics")
        self.assertIn(b'mmogate_sessions{transport="tcp+tls"} 1.0', raw)
        self.assertIn(b'mmogate_sessions{transport="ws+tls"} 1.0', raw)

    async def test_intermediate_ca(self):
        """
        With C{extraCertChain} the gate sends the intermediate CA along,
        so a client that pins only the root verifies it.
        """
        pki = make_pki(self.mktemp(), intermediate=True)
        gate = tls_gate(self, pki)
        for scheme in ("tls", "wss"):
            client = await self.client(gate, scheme, f"i{scheme}",
                                       ca_file=pki.ca_file)
            self.assertEqual(await client.request("echo", 1), 1)
        code, _, _ = await HTTPS(self, gate, ca_file=pki.ca_file).get(
            "/v1/sessions")
        self.assertEqual(code, 200)

    async def test_untrusted_ca_refused(self):
        """
        A client that does not pin the test CA checks the gate against the
        platform's trust store, which does not vouch for it.
        """
        gate = tls_gate(self, self.pki)
        for scheme in ("tls", "wss"):
            await self.refused(gate, scheme)
            await self.refused(gate, scheme,
                               ca_file=make_pki(self.mktemp()).ca_file)
        with self.assertRaises(ResponseNeverReceived) as cm:
            await HTTPS(self, gate).get("/v1/sessions")
        self.assertTrue(cm.exception.reasons[0].check(TLSError))
        await self.no_sessions(gate)

    async def test_wrong_host_name_refused(self):
        """
        A certificate from the pinned CA, but for another name, is refused:
        the client checks the host name it connected to.
        """
        pki = make_pki(self.mktemp(), names=("gate.example",))
        gate = tls_gate(self, pki)
        for scheme in ("tls", "wss"):
            await self.refused(gate, scheme, ca_file=pki.ca_file)
        await self.no_sessions(gate)
        # The same certificate, checked for the name it was issued for
        # (while connecting to 127.0.0.1), is accepted.
        trust = load_trust_root(pki.ca_file)

        def as_gate_example(reactor, address):
            return wrapClientTLS(
                optionsForClientTLS("gate.example", trustRoot=trust),
                TCP4ClientEndpoint(reactor, address.host, address.port,
                                   timeout=TIMEOUT))

        client = await self.client(gate, "tls", "carol",
                                   endpoint_factory=as_gate_example)
        self.assertEqual(await client.request("echo", 2), 2)

    async def test_plain_client_on_tls_port(self):
        """
        Plain TCP frames, a plain WebSocket handshake and plain HTTP sent
        to TLS ports end the connection at once; the gate keeps serving.
        """
        gate = tls_gate(self, self.pki)
        login = json.dumps({"t": "login", "id": 1,
                            "data": {"name": "plain"}}).encode()
        attempts = [
            ("tcp", struct.pack(">I", len(login)) + login),
            ("ws", b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Key: "
                   b"dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   b"Sec-WebSocket-Version: 13\r\n\r\n"),
            ("api", b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\n\r\n")]
        for listener, data in attempts:
            host, port = gate.address(listener)
            raw = await within(connectProtocol(
                TCP4ClientEndpoint(reactor, host, port, timeout=TIMEOUT),
                RawClient()), TIMEOUT, f"a connection to {listener}")
            self.addCleanup(raw.close)
            raw.transport.write(data)
            await raw.wait_lost()
            self.assertNotIn(b"plain", raw.data)
            self.assertNotIn(b"HTTP/1.1", raw.data)
        await self.no_sessions(gate)
        client = await self.client(gate, "tls", "after",
                                   ca_file=self.pki.ca_file)
        self.assertEqual(await client.request("echo", "ok"), "ok")

    async def test_silent_plain_client(self):
        """
        A connection that never starts its TLS handshake holds a session
        only until the heartbeat closes it, like any silent client.
        """
        gate = tls_gate(self, self.pki, session={"heartbeat_ttl": 0.3})
        host, port = gate.address("tcp")
        raw = await within(connectProtocol(
            TCP4ClientEndpoint(reactor, host, port, timeout=TIMEOUT),
            RawClient()), TIMEOUT, "a connection")
        self.addCleanup(raw.close)
        await until(lambda: gate.sessions.sessions, "a session")
        (session,) = gate.sessions.sessions.values()
        self.assertEqual(session.transport_name, "tcp+tls")
        await until(lambda: session.closed, "the heartbeat to close it")
        self.assertEqual(gate.sessions.sessions, {})
        await raw.close()
        await until(lambda: not session.connection.transport.connected,
                    "the gate to close its side")
