"""
A small client for a gate's push and admin API (PROTOCOL.md section 5).

Backend authors reach their players through the gate that holds their
sessions; this wraps the handful of calls in methods returning Deferreds of
the parsed JSON answer, with one persistent connection pool, so a game
service does not re-implement auth headers, error parsing and timeouts.

    client = PushClient("http://127.0.0.1:8090", api_key, reactor=reactor)
    answer = await client.push(["alice"], "chat", {"text": "hi"})
    ...
    await client.close()

Tests: L{tests.test_backend_pushclient}.
"""

import json
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, TimeoutError, succeed
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from zope.interface import Attribute, Interface, implementer

__all__ = ["IPushClient", "PushAPIError", "PushClient"]

#: Persistent connections kept per gate. Twisted's default of 2 makes a busy
#: backend open (and resolve) a new connection for most calls; see PERF-NOTES.
MAX_PERSISTENT_PER_HOST = 64

#: How much of a non-JSON error body is kept in L{PushAPIError.msg}.
_MAX_ERROR_TEXT = 200


class PushAPIError(Exception):
    """
    The push API answered with a status other than 2xx.

    @ivar status: the HTTP status code (L{int}).
    @ivar code: the C{error.code} of the answer when it had one (for example
        C{"bad_request"}), otherwise C{"http_<status>"}; C{"bad_response"}
        when a 2xx answer was not JSON.
    @ivar msg: the C{error.msg} of the answer, or the start of its body.
    """

    def __init__(self, status, code, msg):
        Exception.__init__(self, status, code, msg)
        self.status = status
        self.code = code
        self.msg = msg

    def __str__(self):
        return f"push API answered {self.status} {self.code}: {self.msg}"


class IPushClient(Interface):
    """
    The push and admin calls of one gate; each returns a L{Deferred} of the
    parsed JSON answer or fails with L{PushAPIError}.
    """

    api_url = Attribute("The gate's API base URL, e.g. C{http://127.0.0.1:8090}.")

    def push(players, route, data, persist=True):
        """
        C{POST /v1/push}: C{{"delivered", "queued", "dropped", "unknown"}}.
        """

    def broadcast(route, data):
        """
        C{POST /v1/broadcast}: C{{"delivered": n}}.
        """

    def batch(ops):
        """
        C{POST /v1/batch} with a list of push bodies: C{{"results": [...]}}.
        """

    def kick(player_id, reason="admin", **extra):
        """
        C{POST /v1/kick}: C{{"kicked": bool}}.
        """

    def player(player_id):
        """
        C{GET /v1/players/{id}}: the player's state, or C{None} when unknown.
        """

    def sessions():
        """
        C{GET /v1/sessions}: C{{"sessions": [...]}}.
        """

    def reconnect(addr, player_id=None, all=False):
        """
        C{POST /v1/reconnect} for one player or all: C{{"sent": n}}.
        """

    def drain(addr, deadline):
        """
        C{POST /v1/drain}: C{{"draining": true}}.
        """

    def close():
        """
        Release pooled connections; a L{Deferred} that fires when done.
        """


@implementer(IPushClient)
class PushClient:
    """
    The push and admin API of one gate.

    @param api_url: the gate's C{listen.api} base URL, such as
        C{"http://127.0.0.1:8090"}; a trailing slash is ignored.
    @param api_key: the gate's C{api.key}, sent as a bearer token.
    @param reactor: used for connections and timeouts; the global reactor
        when C{None}.
    @param pool: an L{HTTPConnectionPool} to share with other clients; when
        C{None} the client makes (and L{close} closes) its own.
    @param timeout: seconds a whole call (connect, answer and body) may take
        before it fails with L{twisted.internet.defer.TimeoutError}; C{None}
        or C{0} waits forever. A call cancelled by its caller fails with
        L{CancelledError}.
    @param http: a treq-like object (L{treq.client.HTTPClient},
        L{treq.testing.StubTreq}) to send through instead of a pooled agent,
        for tests; C{pool} is then unused.
    """

    def __init__(
        self, api_url, api_key, *, reactor=None, pool=None, timeout=10.0, http=None
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.api_url = api_url.rstrip("/")
        self._reactor = reactor
        self._timeout = timeout
        self._headers = {
            "Authorization": ["Bearer " + api_key],
            "Accept": ["application/json"],
        }
        self._ownPool = None
        if http is None:
            if pool is None:
                pool = self._ownPool = HTTPConnectionPool(reactor, persistent=True)
                pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
            http = HTTPClient(Agent(reactor, pool=pool))
        self._http = http

    def __repr__(self):
        return f"<PushClient {self.api_url}>"

    def push(self, players, route, data, persist=True):
        return self._call(
            "POST",
            "/v1/push",
            {
                "players": list(players),
                "route": route,
                "data": data,
                "persist": persist,
            },
        )

    def broadcast(self, route, data):
        return self._call("POST", "/v1/broadcast", {"route": route, "data": data})

    def batch(self, ops):
        """
        @param ops: push bodies, each a dict with C{players}, C{route},
            C{data} and optionally C{persist}, sent as given.
        """
        return self._call("POST", "/v1/batch", {"ops": list(ops)})

    def kick(self, player_id, reason="admin", **extra):
        """
        @param extra: further body fields (such as C{msg}) passed through.
        """
        body = dict(extra, player_id=player_id, reason=reason)
        return self._call("POST", "/v1/kick", body)

    def player(self, player_id):
        path = "/v1/players/" + quote(player_id, safe="")
        return self._call("GET", path, None, missingIsNone=True)

    def sessions(self):
        return self._call("GET", "/v1/sessions", None)

    def reconnect(self, addr, player_id=None, all=False):
        """
        Send C{reconnect} to C{player_id}, or to every session with
        C{all=True}; exactly one of the two must be given.

        @raise ValueError: neither or both of C{player_id} and C{all}.
        """
        if (player_id is None) == (not all):
            raise ValueError("reconnect needs exactly one of player_id or all=True")
        body = {"addr": addr}
        if all:
            body["all"] = True
        else:
            body["player_id"] = player_id
        return self._call("POST", "/v1/reconnect", body)

    def drain(self, addr, deadline):
        return self._call("POST", "/v1/drain", {"addr": addr, "deadline": deadline})

    def close(self):
        """
        Close the cached connections of the pool this client made; a shared
        pool passed in is left to its owner.
        """
        if self._ownPool is None:
            return succeed(None)
        return self._ownPool.closeCachedConnections()

    def _call(self, method, path, body, missingIsNone=False):
        kwargs = {"headers": self._headers, "allow_redirects": False}
        if body is not None:
            kwargs["json"] = body
        d = self._http.request(method, self.api_url + path, **kwargs)
        d.addCallback(self._answered, missingIsNone)
        # Our own timer rather than treq's: it covers reading the body too.
        timer = None
        if self._timeout:
            timer = self._reactor.callLater(self._timeout, d.cancel)
        return d.addErrback(_cancelled, timer, self._timeout).addBoth(_stop, timer)

    def _answered(self, response, missingIsNone):
        status = response.code
        if missingIsNone and status == 404:
            # Drain the body so that the connection can go back to the pool.
            return response.content().addCallback(lambda _: None)
        return response.content().addCallback(_parse, status)


def _cancelled(failure, timer, timeout):
    """
    Turn the agent's report of a cancelled request into L{TimeoutError} when
    our timer did it, or plain L{CancelledError} when the caller did.
    """
    if failure.check(ResponseFailed):
        reasons = failure.value.reasons
        if reasons and all(r.check(CancelledError) for r in reasons):
            failure = Failure(CancelledError())
    if failure.check(CancelledError) and timer is not None and not timer.active():
        raise TimeoutError(f"no answer from the push API within {timeout} s")
    return failure


def _stop(result, timer):
    if timer is not None and timer.active():
        timer.cancel()
    return result


def _parse(content, status):
    """
    The JSON of a 2xx answer (C{None} when empty), else a L{PushAPIError}.
    """
    if 200 <= status < 300:
        if not content:
            return None
        try:
            return json.loads(content)
        except ValueError:
            raise PushAPIError(status, "bad_response", _snippet(content)) from None
    code, msg = f"http_{status}", _snippet(content)
    try:
        error = json.loads(content)["error"]
        if isinstance(error.get("code"), str):
            code = error["code"]
        if isinstance(error.get("msg"), str):
            msg = error["msg"]
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    raise PushAPIError(status, code, msg)


def _snippet(content):
    return content[:_MAX_ERROR_TEXT].decode("utf-8", "replace")
