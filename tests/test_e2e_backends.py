"""
End-to-end tests of a gate with several backends (C{backend.urls}) over
real sockets: requests spread per C{backend.balance}; a backend that dies
is retried around (idempotent routes), taken out by its health probe and
put back when it listens again; a slow backend costs its own calls a
C{backend_timeout} and nobody else anything; a garbage-answering backend
gives the right code and costs bounded memory; answers refusing calls (an
unknown path's HTML 404) never open a breaker.

Backends are reference backends or tiny twisted.web resources on
127.0.0.1, port 0, that a test can stop (closing their connections) and
start again on the same port.
"""

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from backend.reference import ReferenceBackend
from gate import errors
from gate.balancer import OPEN
from tests.e2e import (API_KEY, HTTP, auth_token, connect_tcp, start_gate,
                       until)


class BackendServer:
    """
    One backend on 127.0.0.1: C{stop} closes its port and every connection
    to it (as a crashed process would), C{start} listens again on the same
    port.
    """

    def __init__(self, test, resource):
        site = Site(resource)
        site.noisy = False
        site.log = lambda request: None
        self.factory = WrappingFactory(site)
        self.factory.noisy = False
        self.number = 0
        self.port = None
        self.start()
        test.addCleanup(self.stop)

    def start(self):
        self.port = reactor.listenTCP(self.number, self.factory,
                                      interface="127.0.0.1")
        self.number = self.port.getHost().port

    @property
    def url(self):
        return f"http://127.0.0.1:{self.number}"

    @property
    def label(self):
        return f"127.0.0.1:{self.number}"

    def stop(self):
        port, self.port = self.port, None
        for protocol in list(self.factory.protocols):
            protocol.transport.abortConnection()
        if port is None:
            return None
        return port.stopListening()


class Recording(Resource):
    """
    A reference backend that records each RPC's C{(route, player_id)} and
    parks those of C{hold_routes} until the test answers them.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.reference = ReferenceBackend(reactor, api_key=API_KEY)
        self._inner = self.reference.resource()
        self.rpcs = []
        self.hold_routes = set()
        self.held = []

    def render(self, request):
        if request.method == b"POST" and request.postpath[:1] == [b"rpc"]:
            body = json.loads(request.content.read())
            request.content.seek(0)
            self.rpcs.append((body["route"], body["player_id"]))
            if body["route"] in self.hold_routes:
                self.held.append(request)
                return NOT_DONE_YET
        return self._inner.render(request)

    def routes(self, route):
        return [r for r, _ in self.rpcs if r == route]


class HTMLNotFound(Resource):
    """
    A reference backend behind a web framework: RPCs of routes it does not
    know get 404 with an HTML page (most frameworks' default), and route
    C{mine} answers the backend's own code C{backend_error} with a 409.
    """

    isLeaf = True
    ROUTES = (b"/rpc/echo", b"/rpc/whoami")

    def __init__(self):
        Resource.__init__(self)
        self.reference = ReferenceBackend(reactor, api_key=API_KEY)
        self._inner = self.reference.resource()
        self.refused = 0

    def render(self, request):
        if request.method == b"POST" and request.path.startswith(b"/rpc/") \
                and request.path not in self.ROUTES:
            self.refused += 1
            request.setHeader(b"content-type", b"text/html")
            if request.path == b"/rpc/mine":
                request.setResponseCode(409)
                request.setHeader(b"content-type", b"application/json")
                return (b'{"error": {"code": "backend_error", '
                        b'"msg": "my own code"}}')
            request.setResponseCode(404)
            return (b"<!DOCTYPE html><html><head><title>404 Not Found"
                    b"</title></head><body><h1>Not Found</h1></body></html>")
        return self._inner.render(request)


class Hanging(Resource):
    """
    A slow backend: RPCs never get an answer (nor anything at all, with
    C{answer_others} false); the rest is the reference backend's.
    """

    isLeaf = True

    def __init__(self, answer_others=True):
        Resource.__init__(self)
        self.answer_others = answer_others
        self._inner = ReferenceBackend(reactor, api_key=API_KEY).resource()
        self.held = []
        self.lost = []

    def render(self, request):
        if request.method == b"GET" and self.answer_others:
            request.setHeader(b"content-type", b"application/json")
            return b'{"ok": true}'
        if request.postpath[:1] == [b"rpc"] or not self.answer_others:
            self.held.append(request)
            request.notifyFinish().addErrback(
                lambda _: self.lost.append(request))
            return NOT_DONE_YET
        return self._inner.render(request)


class Garbage(Resource):
    """
    A backend that answers RPCs with what no gate should have to take.
    """

    isLeaf = True

    #: A streamed body is cut here, so a gate that keeps reading ends.
    STREAM_CAP = 64 << 20

    def __init__(self, max_body):
        Resource.__init__(self)
        self.max_body = max_body
        self.echo_status = 200
        self.echoes = 0
        self.streams = []
        self.heads = []

    def render_GET(self, request):
        return b'{"ok": true}'

    def render_POST(self, request):
        path = request.path
        if path in (b"/events", b"/gates"):
            request.setResponseCode(204)
            return b""
        if path == b"/rpc/whoami" and self.echo_status != 200:
            request.setResponseCode(self.echo_status)
            return b"oops"
        if path == b"/rpc/echo":
            self.echoes += 1
            if self.echo_status != 200:
                request.setResponseCode(self.echo_status)
                return b"oops"
            data = json.loads(request.content.read())["data"]
            return json.dumps({"data": data}).encode()
        if path == b"/rpc/nonjson":
            return b"<html>surprise</html>"
        if path == b"/rpc/notobject":
            return b"[1, 2, 3]"
        if path == b"/rpc/huge":
            # With a Content-Length far over backend.max_body.
            return b'{"data": "' + b"x" * (4 * self.max_body) + b'"}'
        if path == b"/rpc/e500":
            request.setResponseCode(500)
            return b"Internal Server Error"
        if path == b"/rpc/reset":
            request.transport.abortConnection()
            return NOT_DONE_YET
        if path == b"/rpc/stream":
            self._stream(request)
            return NOT_DONE_YET
        if path == b"/rpc/headers":
            self._headers(request)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b""

    def _headers(self, request):
        """
        C{HTTP/1.1 200} and then headers without end, written raw, as fast
        as the reactor turns, until the gate hangs up.
        """
        state = {"sent": 0, "done": Deferred()}
        self.heads.append(state)
        transport = request.channel.transport
        request.notifyFinish().addBoth(
            lambda _: state["done"].called or state["done"].callback("lost"))
        transport.write(b"HTTP/1.1 200 OK\r\n")
        lines = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000)
                         for i in range(16))

        def more():
            if state["done"].called:
                return
            if state["sent"] > self.STREAM_CAP:
                state["done"].callback("capped")
                return
            transport.write(lines)
            state["sent"] += len(lines)
            reactor.callLater(0, more)

        more()

    def _stream(self, request):
        """
        A chunked body without end (no Content-Length), written as fast
        as the reactor turns, until the gate hangs up.
        """
        state = {"sent": 0, "done": Deferred()}
        self.streams.append(state)
        chunk = b"x" * 16384
        request.notifyFinish().addBoth(
            lambda _: state["done"].called or state["done"].callback("lost"))
        request.write(b'{"data": "')

        def more():
            if state["done"].called:
                return
            if state["sent"] > self.STREAM_CAP:
                state["done"].callback("capped")
                request.finish()
                return
            request.write(chunk)
            state["sent"] += len(chunk)
            reactor.callLater(0, more)

        more()


def events_at(recording, player_id):
    return [e for e in recording.reference.events
            if e["player_id"] == player_id]


class Clients:
    """
    Logs clients in with auth tokens: no backend call, so the policies'
    turns are spent on the test's requests only.
    """

    def __init__(self, test, gate):
        self.test = test
        self.gate = gate

    async def player(self, name):
        client = await connect_tcp(self.test, self.gate)
        answer = await client.request({"t": "auth",
                                       "token": auth_token(name)})
        self.test.assertEqual(answer["t"], "resp", answer)
        return client


async def echo(test, client, data):
    answer = await client.request({"t": "req", "route": "echo",
                                   "data": data})
    test.assertEqual((answer["t"], answer.get("data")), ("resp", data),
                     answer)
    return answer


class SpreadTests(TestCase):
    """
    Requests spread over the backends as C{backend.balance} says.
    """

    def backends(self, n):
        recordings = [Recording() for _ in range(n)]
        servers = [BackendServer(self, r) for r in recordings]
        return recordings, servers

    async def logged_in(self, gate, recordings, name):
        """
        A client of player C{name}, once its C{online} event was delivered
        (one policy turn, spent before the test's requests).
        """
        client = await Clients(self, gate).player(name)
        await until(lambda: sum(len(events_at(r, name)) for r in recordings)
                    == 1, f"the online event of {name}")
        return client

    async def test_round_robin(self):
        recordings, servers = self.backends(3)
        gate = start_gate(self, backend={"urls": [s.url for s in servers],
                                         "balance": "round_robin"})
        # Registration goes to every backend.
        await until(lambda: all("e2e-gate" in r.reference.gates
                                for r in recordings),
                    "a registration at every backend")
        client = await self.logged_in(gate, recordings, "rr")
        for i in range(9):
            await echo(self, client, i)
        self.assertEqual([len(r.routes("echo")) for r in recordings],
                         [3, 3, 3])

    async def test_weighted(self):
        recordings, servers = self.backends(2)
        gate = start_gate(self, backend={"urls": [s.url for s in servers],
                                         "balance": "weighted",
                                         "weights": [2, 1]})
        client = await self.logged_in(gate, recordings, "w")
        for i in range(9):
            await echo(self, client, i)
        # Any 9 consecutive picks are 3 whole cycles of the smooth order.
        self.assertEqual([len(r.routes("echo")) for r in recordings], [6, 3])

    async def test_least_outstanding(self):
        recordings, servers = self.backends(2)
        for r in recordings:
            r.hold_routes.add("hold")
        gate = start_gate(self, backend={"urls": [s.url for s in servers],
                                         "balance": "least_outstanding"})
        clients = Clients(self, gate)
        busy_client = await clients.player("busy")
        other = await clients.player("other")
        busy_client.send({"t": "req", "id": 1, "route": "hold", "data": None})
        await until(lambda: any(r.held for r in recordings),
                    "the held request at a backend")
        busy = next(r for r in recordings if r.held)
        idle = next(r for r in recordings if r is not busy)
        for i in range(4):
            await echo(self, other, i)
        self.assertEqual((len(busy.routes("echo")), len(idle.routes("echo"))),
                         (0, 4))
        request = busy.held.pop()
        request.write(b'{"data": "released"}')
        request.finish()
        answer = await busy_client.expect(lambda e: e.get("id") == 1)
        self.assertEqual(answer["data"], "released")

    async def test_player_hash(self):
        recordings, servers = self.backends(3)
        gate = start_gate(self, backend={"urls": [s.url for s in servers],
                                         "balance": "player_hash"})
        clients = Clients(self, gate)
        names = [f"ph{i}" for i in range(9)]
        for name in names:
            client = await clients.player(name)
            for _ in range(2):
                answer = await client.request({"t": "req", "route": "whoami",
                                               "data": None})
                self.assertEqual(answer["data"], {"player_id": name})
        by_url = {s.url: r for s, r in zip(servers, recordings)}
        used = set()
        for name in names:
            served = [r for r in recordings
                      if ("whoami", name) in r.rpcs]
            self.assertEqual(len(served), 1, name)
            self.assertIs(by_url[gate.backend.member_for(name).url],
                          served[0])
            self.assertEqual(served[0].rpcs.count(("whoami", name)), 2)
            # Its lifecycle events go to the same backend.
            await until(lambda: events_at(served[0], name),
                        f"{name}'s online event at its backend")
            used.add(id(served[0]))
        self.assertGreater(len(used), 1)


class FailingBackendTests(TestCase):
    def metric(self, gate, name, **labels):
        return gate.metrics.registry.get_sample_value(name, labels)

    async def test_dead_backend_retried_taken_out_and_back(self):
        a, b = Recording(), Recording()
        server_a, server_b = BackendServer(self, a), BackendServer(self, b)
        gate = start_gate(self, backend={
            "urls": [server_a.url, server_b.url], "balance": "round_robin",
            "idempotent_routes": ["echo"], "retry_backoff": 0.01,
            "health_interval": 0.1, "breaker_failures": 2,
            "breaker_reset": 0.3, "timeout": 3.0})
        member_a = gate.backend.members[0]
        client = await Clients(self, gate).player("d")
        # A request in flight at A when A dies is retried on B.
        a.hold_routes.add("echo")
        for i in range(3):
            client.send({"t": "req", "id": 100 + i, "route": "echo",
                         "data": "in flight"})
            await until(
                lambda: a.held or any(e.get("id") == 100 + i
                                      for e in client.received),
                "a request held at A or answered by B")
            if a.held:
                break
        self.assertTrue(a.held)
        held_id = 100 + i
        await server_a.stop()
        answer = await client.expect(lambda e: e.get("id") == held_id)
        self.assertEqual((answer["t"], answer["data"]),
                         ("resp", "in flight"))
        self.assertGreaterEqual(self.metric(gate,
                                            "mmogate_backend_retries_total"),
                                1)
        # While A is down, idempotent requests all succeed.
        for i in range(6):
            await echo(self, client, i)
        # The probe takes A out: then every route succeeds, on B.
        await until(lambda: not member_a.healthy, "A's probe to fail")
        self.assertEqual(self.metric(gate, "mmogate_backend_healthy",
                                     backend=server_a.label), 0.0)
        status, _, raw = await HTTP(self, gate, "metrics").get("/ready")
        self.assertEqual(status, 200, raw)
        for _ in range(4):
            answer = await client.request({"t": "req", "route": "whoami",
                                           "data": None})
            self.assertEqual(answer["data"], {"player_id": "d"})
        # A listens again: its probe passes, it serves again.
        a.hold_routes.clear()
        seen = len(a.rpcs)
        server_a.start()
        await until(lambda: member_a.healthy, "A's probe to pass")
        await until(lambda: member_a.breaker.state != OPEN,
                    "A's breaker to let a trial through")
        for i in range(6):
            await echo(self, client, i)
        self.assertGreater(len(a.rpcs), seen)
        self.assertEqual(self.metric(gate, "mmogate_backend_healthy",
                                     backend=server_a.label), 1.0)

    async def test_all_backends_down(self):
        """
        No usable backend: requests fail at once with
        C{backend_unavailable}, and the gate reports itself not ready.
        """
        a, b = Recording(), Recording()
        servers = [BackendServer(self, a), BackendServer(self, b)]
        gate = start_gate(self, backend={"urls": [s.url for s in servers],
                                         "health_interval": 0.1,
                                         "timeout": 3.0})
        client = await Clients(self, gate).player("x")
        for server in servers:
            await server.stop()
        await until(lambda: not gate.backend.reachable,
                    "both probes to fail")
        started = reactor.seconds()
        answer = await client.request({"t": "req", "route": "echo",
                                       "data": 1})
        self.assertEqual((answer["t"], answer["code"]),
                         ("err", errors.BACKEND_UNAVAILABLE))
        self.assertLess(reactor.seconds() - started, 1.0)
        status, _, raw = await HTTP(self, gate, "metrics").get("/ready")
        self.assertEqual(status, 503)
        self.assertIn(b"backend", raw)

    async def test_slow_backend_costs_others_nothing(self):
        good, slow = Recording(), Hanging()
        servers = [BackendServer(self, good), BackendServer(self, slow)]
        gate = start_gate(self, backend={"urls": [s.url for s in servers],
                                         "balance": "player_hash",
                                         "timeout": 1.5,
                                         "health_interval": 0.0,
                                         "breaker_failures": 100})
        names = [f"s{i}" for i in range(64)]
        on_slow = [n for n in names
                   if gate.backend.member_for(n).url == servers[1].url]
        on_good = [n for n in names if n not in on_slow]
        clients = Clients(self, gate)
        stuck = [await clients.player(n) for n in on_slow[:4]]
        fine = await clients.player(on_good[0])
        started = reactor.seconds()
        for client in stuck:
            client.send({"t": "req", "id": 7, "route": "echo", "data": 1})
        await until(lambda: len(slow.held) == len(stuck),
                    "the slow backend to hold every stuck request")
        for i in range(10):
            await echo(self, fine, i)
        # Others were answered while the slow calls still wait.
        self.assertEqual([c.received[1:] for c in stuck], [[]] * len(stuck))
        for client in stuck:
            answer = await client.expect(lambda e: e.get("id") == 7)
            self.assertEqual((answer["t"], answer["code"]),
                             ("err", errors.BACKEND_TIMEOUT))
        self.assertGreaterEqual(reactor.seconds() - started, 1.4)
        # The gate hung up on every slow call: nothing piles up there.
        await until(lambda: len(slow.lost) == len(stuck),
                    "the slow calls' connections to close")
        self.assertEqual(self.metric(gate, "mmogate_backend_requests_total",
                                     backend=servers[1].label,
                                     outcome=errors.BACKEND_TIMEOUT),
                         len(stuck))
        self.assertEqual([m.outstanding for m in gate.backend.members],
                         [0, 0])

    async def test_silent_backend_taken_out_by_probe(self):
        good, silent = Recording(), Hanging(answer_others=False)
        servers = [BackendServer(self, good), BackendServer(self, silent)]
        gate = start_gate(self, backend={"urls": [s.url for s in servers],
                                         "timeout": 0.3,
                                         "health_interval": 0.1})
        await until(lambda: not gate.backend.members[1].healthy,
                    "the silent backend's probe to time out")
        client = await Clients(self, gate).player("q")
        for i in range(6):
            await echo(self, client, i)
        self.assertEqual(len(good.routes("echo")), 6)
        self.assertEqual([r.path for r in silent.held
                          if r.path.startswith(b"/rpc/")], [])

    async def test_refusals_never_open_breakers(self):
        """
        Requests for a route no backend knows get 404 with an HTML page:
        the client gets C{backend_error} (a 4xx without an error body), but
        the backends work, so no breaker opens, nothing is retried, the gate
        stays ready and other players are served. Likewise a backend's own
        code C{backend_error} on a 4xx.
        """
        backends = [HTMLNotFound(), HTMLNotFound()]
        servers = [BackendServer(self, b) for b in backends]
        gate = start_gate(self, backend={"urls": [s.url for s in servers],
                                         "idempotent_routes": ["nosuch",
                                                               "mine"],
                                         "retry_backoff": 0.01,
                                         "breaker_failures": 2,
                                         "health_interval": 0.1,
                                         "timeout": 3.0})
        clients = Clients(self, gate)
        prober = await clients.player("prober")
        bystander = await clients.player("bystander")
        for i in range(10):
            for route, code in (("nosuch", errors.BACKEND_ERROR),
                                ("mine", errors.BACKEND_ERROR)):
                answer = await prober.request({"t": "req", "route": route,
                                               "data": i})
                self.assertEqual((answer["t"], answer["code"]), ("err", code),
                                 answer)
        self.assertEqual(answer["msg"], "my own code")
        # One attempt each: none retried.
        self.assertEqual(sum(b.refused for b in backends), 20)
        self.assertEqual(self.metric(gate, "mmogate_backend_retries_total"),
                         0.0)
        self.assertEqual([m.breaker.state for m in gate.backend.members],
                         ["closed", "closed"])
        for server in servers:
            self.assertEqual(self.metric(gate, "mmogate_backend_breaker",
                                         backend=server.label), 0.0)
            self.assertEqual(self.metric(
                gate, "mmogate_backend_requests_total", backend=server.label,
                outcome=errors.BACKEND_ERROR), 0.0)
        self.assertEqual(sum(self.metric(gate,
                                         "mmogate_backend_requests_total",
                                         backend=s.label,
                                         outcome="backend_code")
                             for s in servers), 20)
        status, _, raw = await HTTP(self, gate, "metrics").get("/ready")
        self.assertEqual(status, 200, raw)
        for i in range(4):
            await echo(self, bystander, i)

    async def test_garbage_backend(self):
        max_body = 4096
        garbage = Garbage(max_body)
        server = BackendServer(self, garbage)
        gate = start_gate(self, backend={"urls": [server.url],
                                         "max_body": max_body,
                                         "max_head": 8192,
                                         "timeout": 3.0,
                                         "health_interval": 0.0,
                                         "breaker_failures": 100})
        clients = Clients(self, gate)
        client = await clients.player("g")
        bystander = await clients.player("h")
        for route, code in (("nonjson", errors.BACKEND_ERROR),
                            ("notobject", errors.BACKEND_ERROR),
                            ("huge", errors.BACKEND_ERROR),
                            ("stream", errors.BACKEND_ERROR),
                            ("headers", errors.BACKEND_ERROR),
                            ("e500", errors.BACKEND_ERROR),
                            ("reset", errors.BACKEND_UNAVAILABLE),
                            ("nothing", errors.ROUTE_NOT_FOUND)):
            started = reactor.seconds()
            answer = await client.request({"t": "req", "route": route,
                                           "data": None})
            self.assertEqual((answer["t"], answer.get("code")), ("err", code),
                             f"{route}: {answer}")
            self.assertLess(reactor.seconds() - started, 2.0, route)
            await echo(self, bystander, route)
        # The endless body was cut by the gate, not by its end.
        (stream,) = garbage.streams
        self.assertEqual(await stream["done"], "lost")
        self.assertLess(stream["sent"], Garbage.STREAM_CAP)
        # So were the endless headers: at backend.max_head, well before
        # backend.timeout (asserted above), so the gate held at most that
        # much of them (plus a read) instead of all it was sent meanwhile.
        (head,) = garbage.heads
        self.assertEqual(await head["done"], "lost")
        self.assertLess(head["sent"], Garbage.STREAM_CAP)
        self.assertEqual(self.metric(gate, "mmogate_backend_requests_total",
                                     backend=server.label,
                                     outcome=errors.BACKEND_ERROR), 6.0)
        self.assertEqual(gate.backend.members[0].outstanding, 0)

    async def test_idempotent_route_retried_past_5xx(self):
        garbage, good = Garbage(4096), Recording()
        servers = [BackendServer(self, garbage), BackendServer(self, good)]
        garbage.echo_status = 500
        gate = start_gate(self, backend={"urls": [s.url for s in servers],
                                         "idempotent_routes": ["echo"],
                                         "retry_backoff": 0.01,
                                         "breaker_failures": 100})
        client = await Clients(self, gate).player("r")
        for i in range(6):
            await echo(self, client, i)
        self.assertGreaterEqual(garbage.echoes, 2)
        self.assertEqual(
            self.metric(gate, "mmogate_backend_retries_total"),
            garbage.echoes)
        # Not idempotent: the 500 reaches the client as backend_error.
        answers = []
        for i in range(2):
            answer = await client.request({"t": "req", "route": "whoami",
                                           "data": None})
            answers.append(answer)
        self.assertEqual(sorted(a["t"] for a in answers), ["err", "resp"])
        err = next(a for a in answers if a["t"] == "err")
        self.assertEqual(err["code"], errors.BACKEND_ERROR)
