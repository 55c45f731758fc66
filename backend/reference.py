"""
The reference game backend (PROTOCOL.md section 4).

A gate started without C{backend.url} runs this in-process; C{python -m
backend} runs it standalone. It is small on purpose but complete: it is what
the gate's own tests, the benchmarks and new backend authors talk to, so it
checks signatures, answers every call of the contract, keeps bounded state
and never blocks.

    backend = ReferenceBackend(reactor, api_key="k", secret="s")
    site = Site(backend.resource())

Routes of C{POST /rpc/{route}} (and of the batch form C{POST /rpc}):

    - C{echo}: answers the C{data} it was sent.
    - C{whoami}: answers C{{"player_id": ...}}.
    - C{say}: C{{"to", "text"}} pushes C{chat} to player C{to} through the
      push API of the gate that player is on; answers the push API's answer.
    - C{fail}: always 500, for tests of C{backend_error}.
    - C{slow}: answers C{{"slept": s}} after C{data.seconds} (at most 30) on
      the injected clock, for tests of C{backend_timeout}.

C{GET /health} answers 200 C{{"ok": true}}, for the gate's health probes
(C{backend.health_path}).

Tests: L{tests.test_backend_reference}.
"""

import json
from collections import OrderedDict, deque
from numbers import Real

from twisted.internet.defer import (
    CancelledError,
    FirstError,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from backend.pushclient import MAX_PERSISTENT_PER_HOST, PushAPIError, PushClient
from backend.signing import SIGNATURE_HEADER, verify

__all__ = ["Answer", "ReferenceBackend", "MAX_ID", "MAX_NAME", "MAX_SLOW_SECONDS"]

#: Longest player name C{/login} accepts.
MAX_NAME = 64

#: Longest player, gate or session id kept; bounds what state can cost.
MAX_ID = 1024

#: Largest C{listen} value of a gate registration kept, encoded as JSON.
MAX_LISTEN = 4096

#: Cap on the C{slow} route's wait, so a test cannot park a call for ever.
MAX_SLOW_SECONDS = 30.0

_EVENTS = frozenset({"online", "offline", "expired"})
_GATE_STATES = frozenset({"up", "draining", "down"})


class Answer:
    """
    One HTTP answer: a status and a JSON-able body, or C{None} for none.

    Handlers return these rather than writing to a request, so the same
    handler serves C{/rpc/{route}} and each call of a batch.
    """

    __slots__ = ("status", "body")

    def __init__(self, status, body=None):
        self.status = status
        self.body = body

    def __repr__(self):
        return f"Answer({self.status!r}, {self.body!r})"


def _error(status, code, msg):
    return Answer(status, {"error": {"code": code, "msg": msg}})


class _Reject(Exception):
    """
    Raised by a handler to answer with an error body.
    """

    def __init__(self, status, code, msg):
        Exception.__init__(self, status, code, msg)
        self.answer = _error(status, code, msg)


def _bounded_set(mapping, key, value, limit):
    """
    Set C{mapping[key]} as the newest entry, dropping the oldest over C{limit}.
    """
    mapping.pop(key, None)
    mapping[key] = value
    while len(mapping) > limit:
        mapping.popitem(last=False)


class ReferenceBackend:
    """
    State and behaviour of the reference backend; L{resource} is its HTTP face.

    @ivar events: the last C{max_events} bodies posted to C{/events}, oldest
        first, as parsed dicts (duplicates included: events are delivered at
        least once).
    @ivar online: player id to the id of the gate the player is online on.
    @ivar gates: gate id to C{{"state", "api_url", "listen", "seen"}} from
        C{/gates}, C{seen} being the clock's time of the last registration.
    @ivar api_url: the fallback push API URL; may be set after construction,
        e.g. once a gate running this in-process knows its API port.

    @param reactor: provides L{IReactorTime} for C{slow}; also what the
        default push clients connect with.
    @param api_key: the gates' C{api.key}, for C{say}'s calls to the push API.
    @param secret: C{backend.secret}; when set, a request without a valid
        C{X-Mmogate-Signature} of its body is answered 401 C{bad_signature}.
    @param api_url: the push API to use when the recipient's gate is unknown.
    @param push_client_factory: called as C{factory(api_url, api_key)} for an
        object with C{push(players, route, data, persist=True)} returning a
        L{Deferred} (an L{IPushClient}); defaults to L{PushClient} on a pool
        shared by all gates. Clients are cached per URL.
    @param max_body: request bodies over this many bytes are answered 413.
    @param max_batch: most calls accepted in one C{POST /rpc}.
    """

    log = Logger()

    #: Distinct push API URLs whose clients are kept.
    max_push_clients = 64

    def __init__(
        self,
        reactor,
        api_key,
        secret=None,
        api_url=None,
        push_client_factory=None,
        *,
        max_events=10_000,
        max_players=100_000,
        max_gates=1_024,
        max_body=1 << 20,
        max_batch=1_000,
    ):
        self._reactor = reactor
        self._api_key = api_key
        self._secret = secret or None
        self.api_url = api_url
        self._push_client_factory = push_client_factory or self._default_push_client
        self._push_clients = OrderedDict()
        self._pool = None
        self._max_players = max_players
        self._max_gates = max_gates
        self.max_body = max_body
        self.max_batch = max_batch
        self.events = deque(maxlen=max_events)
        self.online = OrderedDict()
        self.gates = OrderedDict()
        # player id -> session id of the online entry, so that a late
        # "offline" of a replaced session does not hide the new one.
        self._sessions = OrderedDict()
        # player id -> gate id of the last "online", kept while offline: the
        # player's mailbox is on that gate unless the gates share a store.
        self._last_gate = OrderedDict()
        self._routes = {
            "echo": self._rpc_echo,
            "whoami": self._rpc_whoami,
            "say": self._rpc_say,
            "fail": self._rpc_fail,
            "slow": self._rpc_slow,
        }
        self._resource = _BackendResource(self)

    def resource(self):
        """
        The root L{IResource} to serve, e.g. as C{Site(backend.resource())}.
        """
        return self._resource

    def close(self):
        """
        Drop cached push clients and close their pooled connections.

        @return: a L{Deferred} that fires when the connections are closed.
        """
        closing = [
            maybeDeferred(client.close)
            for client in self._push_clients.values()
            if callable(getattr(client, "close", None))
        ]
        self._push_clients.clear()
        if self._pool is not None:
            closing.append(self._pool.closeCachedConnections())
            self._pool = None
        return gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    # Dispatch

    def handle(self, path, body, signature=None):
        """
        Answer one request without twisted.web: the resource's core, also
        handy for tests.

        @param path: the path segments after the root, such as
            C{["rpc", "echo"]}, already percent-decoded.
        @param body: the raw request body.
        @param signature: the C{X-Mmogate-Signature} header, if any.
        @return: a L{Deferred} that fires with an L{Answer}.
        """
        return maybeDeferred(self._dispatch, path, body, signature).addErrback(
            self._unexpected
        )

    def _dispatch(self, path, body, signature):
        if len(body) > self.max_body:
            return _error(413, "too_large", f"body over {self.max_body} bytes")
        if self._secret is not None and not verify(self._secret, body, signature):
            return _error(401, "bad_signature", f"missing or wrong {SIGNATURE_HEADER}")
        try:
            if path == ["login"]:
                return self._login(_object(body))
            if path == ["events"]:
                return self._event(_object(body))
            if path == ["gates"]:
                return self._gate(_object(body))
            if path == ["rpc"]:
                return self._batch(_object(body))
            if len(path) > 1 and path[0] == "rpc":
                return self.call("/".join(path[1:]), _object(body))
        except _Reject as e:
            return e.answer
        return _error(404, "not_found", "no such call: /" + "/".join(path))

    def _unexpected(self, failure):
        if _cancelled(failure):
            return failure
        self.log.failure("reference backend failed to answer", failure)
        return _error(500, "internal", "the reference backend failed")

    # Login, events, gates

    def _login(self, body):
        data = body.get("data")
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            return _error(
                401,
                "auth_failed",
                f'log in with {{"name": "..."}}, 1 to {MAX_NAME} characters',
            )
        return Answer(
            200,
            {"player_id": name, "data": {"name": name, "welcome": f"welcome, {name}"}},
        )

    def _event(self, body):
        event = body.get("event")
        if event not in _EVENTS:
            raise _Reject(
                400, "bad_request", "event must be online, offline or expired"
            )
        player_id = _id(body, "player_id")
        gate_id = _id(body, "gate_id")
        session_id = _id(body, "session_id", optional=True)
        ts = body.get("ts")
        if ts is not None and not _is_number(ts):
            raise _Reject(400, "bad_request", "ts must be a number")
        self.events.append(
            {
                "event": event,
                "player_id": player_id,
                "gate_id": gate_id,
                "session_id": session_id,
                "ts": ts,
            }
        )
        limit = self._max_players
        if event == "online":
            # Same keys, same order in all three: they evict the same players.
            _bounded_set(self.online, player_id, gate_id, limit)
            _bounded_set(self._sessions, player_id, session_id, limit)
            _bounded_set(self._last_gate, player_id, gate_id, limit)
        elif event == "offline":
            # Only the session that went: a replaced session's late offline
            # must not hide the new one.
            if (
                self.online.get(player_id) == gate_id
                and self._sessions.get(player_id) == session_id
            ):
                del self.online[player_id]
                del self._sessions[player_id]
        else:
            # Expired: the gate dropped the player together with its mailbox.
            if self.online.get(player_id) == gate_id:
                del self.online[player_id]
                del self._sessions[player_id]
            if self._last_gate.get(player_id) == gate_id:
                del self._last_gate[player_id]
        return Answer(204)

    def _gate(self, body):
        gate_id = _id(body, "gate_id")
        state = body.get("state")
        if state not in _GATE_STATES:
            raise _Reject(400, "bad_request", "state must be up, draining or down")
        api_url = body.get("api_url")
        if api_url is not None and not (
            isinstance(api_url, str) and len(api_url) <= MAX_ID
        ):
            raise _Reject(400, "bad_request", "api_url must be a URL string")
        listen = body.get("listen")
        if len(_encode(listen)) > MAX_LISTEN:
            raise _Reject(400, "bad_request", f"listen over {MAX_LISTEN} bytes")
        info = {
            "state": state,
            "api_url": api_url,
            "listen": listen,
            "seen": self._reactor.seconds(),
        }
        _bounded_set(self.gates, gate_id, info, self._max_gates)
        return Answer(204)

    def push_url_for(self, player_id):
        """
        The push API URL to reach C{player_id}, or C{None} when none is known.

        The gate the player is (or was last) on comes first, since without a
        shared store only it holds the session and mailbox; then the
        configured C{api_url}; then the gate that most recently said C{up}.
        """
        gate_id = self.online.get(player_id) or self._last_gate.get(player_id)
        gate = self.gates.get(gate_id)
        if gate is not None and gate["api_url"] and gate["state"] != "down":
            return gate["api_url"]
        if self.api_url:
            return self.api_url
        for gate in reversed(self.gates.values()):
            if gate["state"] == "up" and gate["api_url"]:
                return gate["api_url"]
        return None

    # RPC

    def call(self, route, body):
        """
        Answer one RPC call (a C{/rpc/{route}} body) with an L{Answer}, or a
        L{Deferred} of one. Unknown routes are 404 without a body.
        """
        handler = self._routes.get(route)
        if handler is None:
            return Answer(404)
        player_id = body.get("player_id")
        if not isinstance(player_id, str):
            return _error(400, "bad_request", "player_id must be a string")
        try:
            return handler(player_id, body.get("data"))
        except _Reject as e:
            return e.answer

    def _batch(self, body):
        calls = body.get("calls")
        if not isinstance(calls, list):
            raise _Reject(400, "bad_request", 'expected {"calls": [...]}')
        if len(calls) > self.max_batch:
            raise _Reject(400, "bad_request", f"more than {self.max_batch} calls")
        return gatherResults(
            [self._batch_call(call) for call in calls], consumeErrors=True
        ).addCallback(lambda results: Answer(200, {"results": results}))

    def _batch_call(self, call):
        if not isinstance(call, dict) or not isinstance(call.get("route"), str):
            bad = _error(400, "bad_request", "a call needs a route")
            return maybeDeferred(_result, bad)
        return (
            maybeDeferred(self.call, call["route"], call)
            .addErrback(self._unexpected)
            .addCallback(_result)
        )

    def _rpc_echo(self, player_id, data):
        return Answer(200, {"data": data})

    def _rpc_whoami(self, player_id, data):
        return Answer(200, {"data": {"player_id": player_id}})

    def _rpc_fail(self, player_id, data):
        return _error(500, "backend_error", "the fail route always fails")

    def _rpc_slow(self, player_id, data):
        seconds = data.get("seconds") if isinstance(data, dict) else None
        if not _is_number(seconds) or not seconds >= 0:
            raise _Reject(400, "bad_request", 'slow needs {"seconds": n}, n >= 0')
        seconds = min(float(seconds), MAX_SLOW_SECONDS)
        answer = {"data": {"slept": seconds}}
        return deferLater(self._reactor, seconds, Answer, 200, answer)

    def _rpc_say(self, player_id, data):
        to = data.get("to") if isinstance(data, dict) else None
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(to, str) or not to or not isinstance(text, str):
            raise _Reject(
                400, "bad_request", 'say needs {"to": "<player id>", "text": "..."}'
            )
        api_url = self.push_url_for(to)
        if api_url is None:
            return _error(503, "push_unavailable", "no gate push API known")
        client = self._push_client(api_url)
        d = client.push([to], "chat", {"from": player_id, "text": text})
        d.addCallbacks(lambda answer: Answer(200, {"data": answer}), self._push_failed)
        return d

    def _push_failed(self, failure):
        if _cancelled(failure):
            return failure
        if failure.check(PushAPIError):
            msg = str(failure.value)
        else:
            msg = f"push API unreachable: {failure.getErrorMessage()}"
        self.log.warn("say: {msg}", msg=msg)
        return _error(502, "push_failed", msg)

    def _push_client(self, api_url):
        client = self._push_clients.get(api_url)
        if client is None:
            client = self._push_client_factory(api_url, self._api_key)
        # No close on eviction: default clients share one pool, and a custom
        # factory's clients are the factory's to manage.
        _bounded_set(self._push_clients, api_url, client, self.max_push_clients)
        return client

    def _default_push_client(self, api_url, api_key):
        if self._pool is None:
            self._pool = HTTPConnectionPool(self._reactor, persistent=True)
            self._pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
        return PushClient(api_url, api_key, reactor=self._reactor, pool=self._pool)


def _cancelled(failure):
    """
    Whether C{failure} is a cancellation, also one inside a batch's
    L{FirstError}: cancelled work is not an error to log or answer.
    """
    if failure.check(FirstError):
        failure = failure.value.subFailure
    return failure.check(CancelledError) is not None


def _id(body, key, optional=False):
    """
    C{body[key]} checked to be a string id of bounded length.
    """
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise _Reject(
            400, "bad_request", f"{key} must be a string of 1 to {MAX_ID} characters"
        )
    return value


def _no_constant(name):
    # NaN and Infinity are not JSON; echoing them would send invalid JSON.
    raise ValueError(name)


def _object(body):
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except ValueError:
        raise _Reject(400, "bad_request", "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise _Reject(400, "bad_request", "body must be a JSON object")
    return value


def _result(answer):
    """
    One batch result for an L{Answer}, as C{POST /rpc/{route}} would mean it.
    """
    body = answer.body
    if answer.status == 200 and isinstance(body, dict) and "data" in body:
        return {"data": body["data"]}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return {"error": body["error"]}
    if answer.status == 404:
        return {"error": {"code": "route_not_found", "msg": "no such route"}}
    return {"error": {"code": "backend_error", "msg": f"status {answer.status}"}}


def _is_number(value):
    return isinstance(value, Real) and not isinstance(value, bool)


def _encode(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class _BackendResource(Resource):
    """
    twisted.web face of a L{ReferenceBackend}: every path is handled here.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, backend):
        Resource.__init__(self)
        self._backend = backend

    def render(self, request):
        if request.method in (b"GET", b"HEAD") and request.postpath in (
                [b"health"], [b"health", b""]):
            # The gate's health probe (backend.health_path): unsigned, no
            # body, answered while this process serves.
            _write(request, Answer(200, {"ok": True}))
            return NOT_DONE_YET
        if request.method != b"POST":
            # Answered here, in JSON, rather than by twisted.web's HTML page.
            request.setHeader(b"Allow", b"POST")
            _write(request, _error(405, "method_not_allowed", "only POST is served"))
            return NOT_DONE_YET
        return self.render_POST(request)

    def render_POST(self, request):
        request.content.seek(0)
        body = request.content.read(self._backend.max_body + 1)
        # twisted.web has already split the path and percent-decoded it.
        path = [s.decode("utf-8", "replace") for s in request.postpath]
        if path and path[-1] == "":
            path.pop()  # tolerate a trailing slash
        signature = request.getHeader(SIGNATURE_HEADER)
        d = self._backend.handle(path, body, signature)
        lost = []

        def connectionLost(reason):
            lost.append(True)
            d.cancel()  # e.g. a gate timing out a slow call: stop the work

        request.notifyFinish().addErrback(connectionLost)

        def answer(result):
            if not lost:
                _write(request, result)

        d.addCallback(answer)
        d.addErrback(lambda f: None if _cancelled(f) else f)
        d.addErrback(lambda f: self.log.failure("writing an answer", f))
        return NOT_DONE_YET


def _write(request, answer):
    data = b""
    if answer.body is not None:
        try:
            data = _encode(answer.body)
        except (TypeError, ValueError):
            # Only a bug can get here; the caller must still get an answer.
            _BackendResource.log.failure("cannot encode {answer!r}", answer=answer)
            answer = _error(500, "internal", "the reference backend failed")
            data = _encode(answer.body)
        request.setHeader(b"Content-Type", b"application/json")
    request.setResponseCode(answer.status)
    request.setHeader(b"Content-Length", b"%d" % (len(data),))
    if data:
        request.write(data)
    request.finish()
