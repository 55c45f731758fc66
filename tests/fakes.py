"""
Fakes shared by the gate's unit tests: a client connection that records what
it is sent, a scripted backend client, stores that answer late, and a small
stack (clock, stores, players, sessions) wired the way L{gate.service} wires
it, minus the sockets.
"""

import json
from collections import namedtuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from gate.config import from_mapping
from gate.interfaces import (IBackendClient, IClientConnection,
                             IMailboxStore, IPlayerDirectory)
from gate.player import PlayerManager
from gate.session import SessionManager
from gate.tokens import Tokens
from gate.workers import WorkerPool
from mmogate_plugins.memory import MemoryMailboxStore, MemoryPlayerDirectory

#: 32+ bytes, so PyJWT does not warn about short HMAC keys.
AUTH_SECRET = "auth-secret-for-tests-0123456789abcdef"
API_KEY = "api-key-for-tests"
GATE_ID = "gate-test"


def make_config(**changes):
    """
    A checked config as an operator's file would give it, with C{changes}
    (C{session__max_frame=...}) applied.
    """
    config = from_mapping({"gate": {"id": GATE_ID},
                           "api": {"key": API_KEY},
                           "auth": {"secret": AUTH_SECRET},
                           "backend": {"url": "http://backend.invalid"}},
                          from_file=True)
    return config.replace(**changes) if changes else config


@implementer(IClientConnection)
class FakeConnection:
    """
    An L{IClientConnection} that records every payload sent to it.
    """

    def __init__(self, transport_name="tcp", peer="10.0.0.1:5000"):
        self.transport_name = transport_name
        self.peer = peer
        self.sent = []
        self.closed = False
        self.aborted = False
        #: Set by a test to play a client that does not keep up.
        self.paused = False

    def send(self, outgoing):
        self.sent.append(outgoing)

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True

    @property
    def messages(self):
        """
        Every envelope sent so far, decoded.
        """
        return [json.loads(o.payload) for o in self.sent]

    def take(self):
        """
        The envelopes sent since the last C{take}, decoded.
        """
        messages = self.messages
        self.sent = []
        return messages


class Pending:
    """
    One call to a fake, with the L{Deferred} the test fires.
    """

    def __init__(self, args):
        self.args = args
        self.d = Deferred()

    def __repr__(self):
        return f"Pending{self.args!r}"


@implementer(IBackendClient)
class FakeBackend:
    """
    A scripted L{IBackendClient}.

    C{login} answers at once as the player named by C{data["name"]} unless
    C{auto_login} is false; C{call} always waits for the test to fire
    C{calls[i].d}; C{event} and C{register} take their outcomes from
    C{event_outcomes} / C{register_outcomes} (C{None} success, an exception
    failure, C{"pending"} left for the test), succeeding when those are
    empty.
    """

    def __init__(self):
        self.auto_login = True
        self.logins = []
        self.calls = []
        self.events = []
        self.event_outcomes = []
        self.registrations = []
        self.register_outcomes = []
        self.closed = False
        self.reachable = None

    def login(self, session_id, data):
        pending = Pending((session_id, data))
        self.logins.append(pending)
        if self.auto_login:
            pending.d.callback((data["name"], {"welcome": data["name"]}))
        return pending.d

    def call(self, session_id, player_id, request_id, route, data):
        pending = Pending((session_id, player_id, request_id, route, data))
        self.calls.append(pending)
        return pending.d

    def _outcome(self, outcomes, log, body):
        pending = Pending((body,))
        log.append(pending)
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is None:
            pending.outcome = "ok"
            pending.d.callback(None)
        elif outcome == "pending":
            pending.outcome = "pending"
        else:
            pending.outcome = "failed"
            pending.d.errback(Failure(outcome))
        return pending.d

    def event(self, body):
        return self._outcome(self.event_outcomes, self.events, body)

    def register(self, body):
        return self._outcome(self.register_outcomes, self.registrations, body)

    def close(self):
        self.closed = True
        return succeed(None)


Emitted = namedtuple("Emitted", "event player_id session_id")


class RecordingEvents:
    """
    Stands in for L{gate.events.EventSender}: records what is emitted.
    """

    def __init__(self):
        self.emitted = []

    def emit(self, event, player_id, session_id):
        self.emitted.append(Emitted(event, player_id, session_id))

    def of(self, player_id):
        return [(e.event, e.session_id) for e in self.emitted
                if e.player_id == player_id]


class LateAnswers:
    """
    Wraps a store so that the methods named in C{hold} do their work at
    once but answer only when the test fires them, as a networked store
    (Redis, PostgreSQL) would: the operation is applied when sent, the reply
    arrives later.
    """

    def __init__(self, store, hold=()):
        self._store = store
        self.hold = set(hold)
        self.pending = []

    def _call(self, name, *args):
        d = getattr(self._store, name)(*args)
        if name not in self.hold:
            return d
        results = []
        d.addBoth(results.append)
        late = Pending((name,) + args)
        late.result = results[0]
        self.pending.append(late)
        return late.d

    def waiting(self, name=None):
        return [p for p in self.pending
                if not p.d.called and (name is None or p.args[0] == name)]

    def fire(self, name):
        """
        Answer the oldest held call of C{name}.
        """
        waiting = self.waiting(name)
        if not waiting:
            raise AssertionError(f"no {name} call is waiting; "
                                 f"pending: {self.pending!r}")
        late = waiting[0]
        late.d.callback(late.result)
        return late

    def fire_all(self):
        while self.waiting():
            late = self.waiting()[0]
            late.d.callback(late.result)


@implementer(IMailboxStore)
class LateMailboxStore(LateAnswers):
    def append(self, player_ids, route, data, ts):
        return self._call("append", player_ids, route, data, ts)

    def read_after(self, player_id, last_seq):
        return self._call("read_after", player_id, last_seq)

    def ack(self, player_id, seq):
        return self._call("ack", player_id, seq)

    def last_seq(self, player_id):
        return self._call("last_seq", player_id)

    def size(self, player_id):
        return self._call("size", player_id)

    def drop(self, player_id):
        return self._call("drop", player_id)


@implementer(IPlayerDirectory)
class LateDirectory(LateAnswers):
    def claim(self, player_id, gate_id, session_id, now, epoch=None,
              issued=None):
        return self._call("claim", player_id, gate_id, session_id, now, epoch)

    def release(self, player_id, gate_id, session_id, now):
        return self._call("release", player_id, gate_id, session_id, now)

    def lookup(self, player_id):
        return self._call("lookup", player_id)

    def forget(self, player_id):
        return self._call("forget", player_id)

    def expire(self, player_id, gate_id, epoch):
        return self._call("expire", player_id, gate_id, epoch)


class FailingMailboxStore(MemoryMailboxStore):
    """
    A memory store whose C{append} fails (the store went away).
    """

    def append(self, player_ids, route, data, ts):
        return fail(RuntimeError("store unreachable"))


class Stack:
    """
    The gate's objects without listeners: a L{Clock}, in-memory stores,
    players, a worker pool, sessions, tokens and a L{FakeBackend}.

    @param hold_mailbox: names of mailbox store methods that answer late
        (see L{LateAnswers}).
    @param hold_directory: likewise for the player directory.
    """

    def __init__(self, hold_mailbox=(), hold_directory=(), events=None,
                 **changes):
        self.clock = Clock()
        self.config = config = make_config(**changes)
        self.backend = FakeBackend()
        self.memory_mailboxes = MemoryMailboxStore(
            self.clock, config["player.mailbox_max"],
            config["player.idle_timeout"])
        self.memory_directory = MemoryPlayerDirectory()
        self.mailboxes = self.memory_mailboxes
        self.directory = self.memory_directory
        if hold_mailbox:
            self.mailboxes = LateMailboxStore(self.memory_mailboxes,
                                              hold_mailbox)
        if hold_directory:
            self.directory = LateDirectory(self.memory_directory,
                                           hold_directory)
        self.events = events if events is not None else RecordingEvents()
        self.tokens = Tokens(config["auth.secret"], self.clock,
                             config["auth.resume_ttl"])
        self.pool = WorkerPool(self.clock, config["workers.min"],
                               config["workers.max"],
                               config["workers.grow_queue"],
                               config["workers.idle_timeout"],
                               config["workers.max_queue"])
        self.players = PlayerManager(self.clock, config["gate.id"],
                                     self.directory, self.mailboxes,
                                     self.events,
                                     config["player.idle_timeout"])
        self.sessions = SessionManager(self.clock, config, self.players,
                                       self.pool, self.backend, self.tokens)
        self._next_id = 0

    def connect(self, transport_name="tcp", peer="10.0.0.1:5000"):
        """
        A new client connection: C{(session, connection)}.
        """
        connection = FakeConnection(transport_name, peer)
        return self.sessions.open(connection), connection

    def send(self, session, **envelope):
        """
        Send C{envelope} as the client would (JSON bytes).
        """
        session.receive(json.dumps(envelope).encode("utf-8"))

    def request_id(self):
        self._next_id += 1
        return self._next_id

    def login(self, name, session=None):
        """
        Log C{name} in on a new (or the given) session; return
        C{(session, connection, resp)}.
        """
        if session is None:
            session, connection = self.connect()
        else:
            connection = session.connection
        rid = self.request_id()
        before = len(connection.sent)
        self.send(session, t="login", id=rid, data={"name": name})
        answers = [m for m in connection.messages[before:]
                   if m.get("id") == rid]
        if len(answers) != 1 or answers[0]["t"] != "resp":
            raise AssertionError(f"login of {name} answered {answers!r}")
        return session, connection, answers[0]

    def push(self, player_ids, route="note", data=None, persist=True):
        """
        A push through the player manager; the L{gate.player.PushResult}
        once it is done (the stores here answer at once unless held).
        """
        results = []
        self.players.push(player_ids, route, data, persist).addBoth(
            results.append)
        return results[0] if results else None


def advance_in_steps(clock, seconds, step=0.05):
    """
    Advance C{clock} by C{seconds} in small steps, so that calls scheduled
    by calls run on the way (retries, backoff) run too.
    """
    steps = int(round(seconds / step))
    for _ in range(steps):
        clock.advance(step)


def http_request(site, method, path, body=None, headers=None, chunks=None,
                 clock=None):
    """
    Send one HTTP/1.1 request to C{site} over a L{StringTransport}, with a
    C{Content-Length} body or, with C{chunks}, a chunked one; return
    C{(status, headers, body)} of the response, headers as a dict of
    lower-cased names to the last value.
    """
    if clock is None:
        clock = Clock()
    site.reactor = clock
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8090),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    lines = [f"{method} {path} HTTP/1.1".encode("ascii"), b"Host: gate"]
    for name, value in (headers or {}).items():
        lines.append(name.encode("ascii") + b": " + value.encode("utf-8"))
    payload = b""
    if chunks is not None:
        lines.append(b"Transfer-Encoding: chunked")
        for chunk in chunks:
            payload += b"%x\r\n%s\r\n" % (len(chunk), chunk)
        payload += b"0\r\n\r\n"
    elif body is not None:
        lines.append(b"Content-Length: %d" % (len(body),))
        payload = body
    channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + payload)
    raw = transport.value()
    channel.connectionLost(Failure(ConnectionDone()))
    return parse_response(raw)


def parse_response(raw):
    """
    C{(status, headers, body)} of one raw HTTP/1.1 response.
    """
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"incomplete HTTP response: {raw!r}")
    status_line, *header_lines = head.split(b"\r\n")
    status = int(status_line.split(b" ")[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("ascii")] = value.strip().decode(
            "latin-1")
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    elif "content-length" in headers:
        body = rest[:int(headers["content-length"])]
    else:
        body = rest
    return status, headers, body
