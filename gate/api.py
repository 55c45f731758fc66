"""
The push and admin API (PROTOCOL.md section 5) on C{listen.api}.

Every call is checked whole before it has any effect: a batch with one bad
op is refused as a whole (400), so a backend never has to guess which of its
pushes went out.
"""

import hmac

from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from gate.deadline import DeadlineChannel
from gate.drain import NotRunning, check_deadline, check_target
from gate.envelope import encode, loads, too_deep
from gate.errors import GateError

MAX_ID = 256
MAX_ROUTE = 128
#: Most audit events one GET /v1/history answers (a larger limit is cut).
MAX_HISTORY = 1000

#: API bodies may nest this many levels more than client envelopes
#: (C{session.max_depth}): enough for a C{/v1/batch} op to carry C{data} as
#: deep as a client's C{req} may.
API_DEPTH_ALLOWANCE = 2

#: Longest ban C{/v1/kick} takes: ten years, so a ban's end stays a
#: plain number of seconds.
MAX_BAN_SECONDS = 10 * 365 * 86400


class BadBody(Exception):
    """
    The body is not of the shape the call needs; the message says why.
    """


class LimitedRequest(server.Request):
    """
    A request whose body is discarded beyond C{site.max_body} bytes, so an
    oversized upload costs no memory and is answered 413.
    """

    too_large = False
    _received = 0

    def gotLength(self, length):
        limit = self.channel.site.max_body
        if length is not None and length > limit:
            self.too_large = True
            length = 0
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data):
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        server.Request.handleContentChunk(self, data)

    def process(self):
        if self.too_large:
            self.setResponseCode(413)
            self.setHeader(b"content-type", b"application/json")
            self.setHeader(b"connection", b"close")
            self.write(encode({"error": {
                "code": "too_large",
                "msg": f"body is over api.max_body "
                       f"({self.channel.site.max_body} bytes)"}}))
            self.finish()
            return
        server.Request.process(self)


class APISite(server.Site):
    """
    @param request_timeout: seconds a request may take to arrive whole
        (C{api.request_timeout}; see L{gate.deadline}).
    """

    requestFactory = LimitedRequest
    protocol = DeadlineChannel
    noisy = False

    def __init__(self, resource, max_body, request_timeout=None):
        server.Site.__init__(self, resource)
        self.max_body = max_body
        self.request_timeout = request_timeout

    def log(self, request):
        # Access lines for every push would drown the structured log.
        pass


def _string(value, name, limit):
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadBody(f"'{name}' must be a non-empty string of at most "
                      f"{limit} characters")
    return value


def check_push(body, where=""):
    """
    Check one push body; return C{(players, route, data, persist)}.
    """
    if not isinstance(body, dict):
        raise BadBody(f"{where}push body must be a JSON object")
    players = body.get("players")
    if not isinstance(players, list):
        raise BadBody(f"{where}'players' must be a list of player ids")
    for player_id in players:
        _string(player_id, f"{where}players[]", MAX_ID)
    route = _string(body.get("route"), f"{where}route", MAX_ROUTE)
    persist = body.get("persist", True)
    if not isinstance(persist, bool):
        raise BadBody(f"{where}'persist' must be true or false")
    return players, route, body.get("data"), persist


def _target(body):
    """
    The C{reconnect} target of a body: C{addr}, with C{addrs} per transport.
    """
    try:
        return check_target(body.get("addr"), body.get("addrs"))
    except ValueError as e:
        raise BadBody(str(e))


def _field(name, value):
    """
    C{{name: value}}, or a L{Deferred} of it when C{value} comes later (from
    a store shared with other gates).
    """
    if hasattr(value, "addCallback"):
        return value.addCallback(lambda found: {name: found})
    return {name: value}


class APIResource(Resource):
    """
    All of C{/v1/...}, dispatched by method and path.

    @param gate: the L{gate.service.GateService} it operates on.
    @param max_depth: the deepest JSON nesting accepted in a body.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, gate, api_key, max_depth=64):
        Resource.__init__(self)
        self._gate = gate
        self._key = ("Bearer " + api_key).encode("utf-8")
        self._max_depth = max_depth

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        given = request.getHeader(b"authorization") or b""
        if not hmac.compare_digest(given, self._key):
            return self._error(request, 401, "unauthorized",
                               "missing or wrong 'Authorization: Bearer' key")
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        parts = path.strip("/").split("/")
        if len(parts) < 2 or parts[0] != "v1":
            return self._error(request, 404, "not_found", f"no such call {path}")
        name = parts[1]
        if name == "players" and len(parts) == 3:
            handler, wanted = self._player, "GET"
            args = (http.unquote(parts[2].encode("utf-8")).decode("utf-8",
                                                                "replace"),)
        elif name == "history" and len(parts) == 2:
            handler, wanted, args = self._history, "GET", (request.args,)
        elif len(parts) == 2 and name in self._calls:
            wanted, handler = self._calls[name]
            handler = handler.__get__(self)
            args = ()
        else:
            return self._error(request, 404, "not_found", f"no such call {path}")
        if method != wanted:
            request.setHeader(b"allow", wanted.encode("ascii"))
            return self._error(request, 405, "method_not_allowed",
                               f"{path} takes {wanted}")
        if wanted == "POST":
            raw = request.content.read()
            try:
                body = loads(raw)
            except (ValueError, RecursionError) as e:
                return self._error(request, 400, "bad_request",
                                   f"body is not JSON: {e}")
            if too_deep(raw, self._max_depth):
                return self._error(request, 400, "bad_request",
                                   f"body nests deeper than "
                                   f"{self._max_depth} levels")
            args = (body,)
        try:
            result = handler(*args)
        except BadBody as e:
            return self._error(request, 400, "bad_request", str(e))
        except NotRunning as e:
            return self._error(request, 503, "unavailable", str(e))
        if hasattr(result, "addCallback"):
            result.addCallbacks(lambda answer: self._finish(request, answer),
                                lambda f: self._failed(request, f))
            return server.NOT_DONE_YET
        return self._answer(request, result)

    def _answer(self, request, answer):
        if answer is None:
            return self._error(request, 404, "not_found", "no such player")
        return encode(answer)

    def _finish(self, request, answer):
        if request.finished or request._disconnected:
            return
        request.write(self._answer(request, answer))
        request.finish()

    def _failed(self, request, failure):
        if failure.check(GateError):
            # An expected refusal (the shared store is away): no traceback.
            self.log.warn("push API call refused: {error}",
                          error=failure.getErrorMessage())
        else:
            self.log.failure("push API call failed", failure)
        if request.finished or request._disconnected:
            return
        request.setResponseCode(503)
        request.write(encode({"error": {"code": "unavailable",
                                        "msg": failure.getErrorMessage()}}))
        request.finish()

    def _error(self, request, status, code, msg):
        request.setResponseCode(status)
        return encode({"error": {"code": code, "msg": msg}})

    # The calls.

    def _push(self, body):
        players, route, data, persist = check_push(body)
        return self._gate.players.push(players, route, data, persist) \
            .addCallback(lambda result: result.as_dict())

    def _broadcast(self, body):
        if not isinstance(body, dict):
            raise BadBody("body must be a JSON object")
        route = _string(body.get("route"), "route", MAX_ROUTE)
        return _field("delivered", self._gate.players.broadcast(
            route, body.get("data")))

    def _batch(self, body):
        ops = body.get("ops") if isinstance(body, dict) else None
        if not isinstance(ops, list):
            raise BadBody("'ops' must be a list of push bodies")
        checked = [check_push(op, f"ops[{i}].") for i, op in enumerate(ops)]
        d = gatherResults([self._gate.players.push(*op) for op in checked],
                          consumeErrors=True)
        return d.addCallback(lambda results: {
            "results": [r.as_dict() for r in results]})

    def _kick(self, body):
        if not isinstance(body, dict):
            raise BadBody("body must be a JSON object")
        player_id = _string(body.get("player_id"), "player_id", MAX_ID)
        reason = body.get("reason", "kicked by an operator")
        if not isinstance(reason, str) or len(reason) > 512:
            raise BadBody("'reason' must be a string of at most 512 characters")
        ban = body.get("ban_seconds")
        if ban is not None and (isinstance(ban, bool)
                                or not isinstance(ban, (int, float))
                                or not 0 <= ban <= MAX_BAN_SECONDS):
            raise BadBody(f"'ban_seconds' must be a number from 0 to "
                          f"{MAX_BAN_SECONDS}")
        return _field("kicked", self._gate.players.kick(
            player_id, "admin", reason or "kicked by an operator",
            ban_seconds=ban))

    def _player(self, player_id):
        return self._gate.players.info(player_id)

    def _sessions(self):
        return {"sessions": [
            {"session_id": s.id, "player_id": s.player_id,
             "transport": s.transport_name, "peer": s.peer, "since": s.since}
            for s in self._gate.sessions.sessions.values()]}

    def _history(self, query):
        """
        C{GET /v1/history?player_id=&session_id=&limit=}: the session audit
        log, newest first (an extension of PROTOCOL.md section 5).
        """
        def one(name):
            values = query.get(name.encode("ascii"))
            if not values:
                return None
            if len(values) > 1:
                raise BadBody(f"'{name}' given more than once")
            try:
                return values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise BadBody(f"'{name}' is not UTF-8")

        player_id, session_id, limit = (one("player_id"), one("session_id"),
                                        one("limit"))
        for name, value in (("player_id", player_id),
                            ("session_id", session_id)):
            if value is not None:
                _string(value, name, MAX_ID)
        if limit is None:
            limit = 100
        elif not (limit.isascii() and limit.isdigit() and int(limit) > 0):
            raise BadBody("'limit' must be a positive integer")
        return self._gate.audit.history(
            player_id, session_id, min(int(limit), MAX_HISTORY)).addCallback(
                lambda events: {"events": events})

    def _reconnect(self, body):
        if not isinstance(body, dict):
            raise BadBody("body must be a JSON object")
        target = _target(body)
        player_id = body.get("player_id")
        everyone = body.get("all", False)
        if not isinstance(everyone, bool):
            raise BadBody("'all' must be true or false")
        if everyone == (player_id is not None):
            raise BadBody("give either 'player_id' or \"all\": true")
        if everyone:
            return {"sent": self._gate.drainer.reconnect_all(target, "admin")}
        player_id = _string(player_id, "player_id", MAX_ID)
        # Another gate's player may be reached through the shared store,
        # which answers later.
        return maybeDeferred(self._gate.players.reconnect, player_id, target,
                             "admin").addCallback(
            lambda sent: {"sent": 1 if sent else 0})

    def _drain(self, body):
        if not isinstance(body, dict):
            raise BadBody("body must be a JSON object")
        target = _target(body)
        deadline = body.get("deadline")
        if deadline is not None:
            try:
                deadline = check_deadline(deadline)
            except ValueError as e:
                raise BadBody(str(e))
        self._gate.drain(target, deadline)
        return {"draining": True}

    _calls = {
        "push": ("POST", _push),
        "broadcast": ("POST", _broadcast),
        "batch": ("POST", _batch),
        "kick": ("POST", _kick),
        "sessions": ("GET", _sessions),
        "reconnect": ("POST", _reconnect),
        "drain": ("POST", _drain),
    }
