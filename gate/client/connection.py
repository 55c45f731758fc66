"""
L{GateClient}: one player's session with a gate, kept alive across dropped
connections, gate restarts and drains.

All envelope logic (binding, requests, push dedupe, acks, heartbeats,
reconnects) is here, in plain objects; the transports in
L{gate.client.protocol} only carry payloads. Tests drive it with a
C{task.Clock} and an in-memory transport.
"""

import json
import random
from functools import partial
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gate.client import errors
from gate.client.address import endpoint_for, load_trust_root, parse_address
from gate.client.errors import GateError
from gate.client.framing import DEFAULT_MAX_FRAME
from gate.client.protocol import FramedFactory, IPayloadReceiver, websocket_factory
from gate.client.secure import (DEFAULT_REKEY_FRAMES, SecureFramedFactory,
                                parse_gate_key)

#: Acks are coalesced: one every this many seconds at most, for the highest
#: seq handed to the application. Sooner frees the gate's mailbox sooner;
#: later saves messages under a burst of pushes.
ACK_DELAY = 0.2
#: First reconnect delay; it doubles per failed attempt up to max_backoff,
#: and each delay is drawn from its upper half so that clients dropped
#: together do not return together.
INITIAL_BACKOFF = 0.5
#: A bound connection that has been silent this many ping intervals (the gate
#: answers each ping) is taken as dead, so a half-open TCP connection does not
#: leave the client waiting forever.
SILENT_INTERVALS = 3
#: Kicks after which reconnecting would be wrong: another session now owns
#: the player, or an operator removed it. Other kicks (shutdown, idle,
#: slow_consumer) are recovered from by reconnecting and resuming.
FATAL_KICKS = frozenset({"replaced", "admin"})
#: Errors that say "not now" rather than "no": a bind failing with one of
#: these is retried with backoff instead of being given up.
RETRYABLE = frozenset({"busy", "rate_limited", "backend_unavailable",
                       "backend_timeout", "backend_error", "internal"})

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)


def _encode(obj):
    return _encoder.encode(obj).encode("utf-8")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(reason):
    if isinstance(reason, Failure):
        reason = reason.value
    if isinstance(reason, GateError):
        return reason.msg
    return str(reason) or type(reason).__name__


class Push(NamedTuple):
    """
    A message from a backend, handed to C{on_push} exactly once.

    @ivar seq: the per-player sequence number of a persistent push, or
        C{None} for a transient push or broadcast.
    @ivar ts: when the gate accepted it (unix seconds), if it said.
    """

    route: str
    data: Any
    ts: float | None
    seq: int | None

    @property
    def persistent(self):
        return self.seq is not None


@implementer(IPayloadReceiver)
class _Link:
    """
    One connection (or attempt) to a gate and what is in flight on it.

    Requests belong to the connection they were sent on: when it goes, they
    fail, whatever the client does next.
    """

    def __init__(self, client, address):
        self.client = client
        self.address = address
        self.sender = None
        self.protocol = None
        self.dial = None
        self.deadline = None
        self.pending = {}
        self.bind_id = None
        self.bind_kind = None
        self.bound = False
        self.closing = False
        self.dead = False
        self.finished = False
        self.error = None
        self.kick = None
        self.kick_msg = ""
        self.acked = 0
        self.heard = None
        #: The gate told this connection to C{reconnect} elsewhere.
        self.moving = False
        self._waiters = []

    def payloadConnected(self, sender):
        self.sender = sender
        self.client._linkUp(self)

    def payloadReceived(self, payload):
        if not self.dead:
            self.client._payload(self, payload)

    def payloadLost(self, reason):
        self.client._linkLost(self, reason)

    def dialed(self, protocol):
        self.protocol = protocol
        if self.dead and not self.finished:
            protocol.abortConnection()

    def send(self, obj):
        self.sendPayload(_encode(obj))

    def sendPayload(self, payload):
        if self.sender is not None and not self.dead:
            self.sender.sendPayload(payload)

    def close(self):
        """
        Close gracefully: what was sent is flushed; replies still in flight
        fail when the connection is gone.
        """
        if self.finished or self.closing:
            return
        if self.sender is None:
            self.drop()
            return
        self.closing = True
        self.sender.loseConnection()

    def drop(self, error=None):
        """
        Abandon this connection now; C{error} is what it failed with.
        """
        if self.finished:
            return
        if error is not None and self.error is None:
            self.error = error
        self.dead = True
        # Before a WebSocket handshake completes there is a protocol but no
        # sender yet; both provide abortConnection.
        target = self.sender or self.protocol
        if target is not None:
            target.abortConnection()
        elif self.dial is not None:
            self.dial.cancel()

    def whenLost(self):
        if self.finished:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        return d

    def finish(self):
        self.finished = True
        self.dead = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class GateClient:
    """
    A game client's session with a gate (PROTOCOL.md sections 1-3).

    It binds with C{login} data or a C{token}, then keeps the session alive:
    it answers the gate's pings and sends its own every C{ping_interval}
    seconds, acks pushes, and after a dropped connection (or a kick for
    C{shutdown}, C{idle} or C{slow_consumer}) reconnects with exponential
    backoff and jitter, capped at C{max_backoff} seconds, and C{resume}s so
    that persistent pushes continue where they stopped. A gate's
    C{reconnect} moves the session to the address it names.

    It gives up, firing C{on_state("closed", ...)}, after C{close()}, a kick
    for C{replaced} or C{admin}, a login or auth refused with a code not in
    L{RETRYABLE}, or (with C{reconnect=False}) any lost connection. A resume
    that is refused falls back to a fresh login or auth with the original
    credentials: the player's state on the server may have been reset, so
    C{on_state("logged_in", ...)} is the application's cue to reload it.

    Callbacks, all optional; an exception raised by one is logged, never
    propagated into the client:
      - C{on_push(push)}: a L{Push}, each exactly once.
      - C{on_gap(first, last)}: persistent pushes C{first..last} were
        dropped by the gate's retention limits and will never arrive.
      - C{on_kick(reason, msg)}: the gate is ending the session.
      - C{on_state(state, info)}: C{state} is one of C{connecting},
        C{logged_in}, C{resumed}, C{resume_failed}, C{disconnected},
        C{reconnecting}, C{migrating}, C{migration_failed}, C{closed};
        C{info} is a dict of details (C{addr}, C{code}, C{msg}, C{delay},
        ...).

    @param addr: C{tcp://host:port}, C{tls://host:port},
        C{ws://host:port/ws}, C{wss://host:port/ws} or
        C{tcp+enc://host:port} (the encrypted channel); a bare
        C{host:port} is TCP. Or a list of them, the gates of one cluster:
        the client starts with the first, and a reconnect attempt that
        fails moves it on to the next, so the players of a gate that died
        resume on another.
    @param clock: the L{IReactorTime} for every timer (default: C{reactor}).
    @param ca_file: PEM file of the CA(s) to trust for C{tls}/C{wss}
        instead of the platform's store.
    @param connect_timeout: seconds allowed to connect and bind before an
        attempt is abandoned.
    @param max_frame: largest payload accepted from the gate.
    @param gate_key: for C{tcp+enc://}: the gate's Ed25519 public key
        (base64, as C{twistd mmogate --public-key} prints it) to pin; a
        gate that proves another key is hung up on.
    @param rekey_frames: for C{tcp+enc://}: frames sent under one key
        before the client rotates its direction.
    @param endpoint_factory: C{(reactor, address) -> IStreamClientEndpoint},
        replacing the default TCP/TLS endpoints (proxies, tests).
    """

    log = Logger()

    def __init__(self, reactor, addr, *, login=None, token=None,
                 on_push=None, on_gap=None, on_kick=None, on_state=None,
                 ping_interval=20.0, reconnect=True, max_backoff=30.0,
                 clock=None, ca_file=None, connect_timeout=30.0,
                 max_frame=DEFAULT_MAX_FRAME, endpoint_factory=None,
                 gate_key=None, rekey_frames=DEFAULT_REKEY_FRAMES):
        if (login is None) == (token is None):
            raise ValueError("give exactly one of login= or token=")
        if token is not None and not (isinstance(token, str) and token):
            raise ValueError("token must be a non-empty string")
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        addrs = list(addr) if isinstance(addr, (list, tuple)) else [addr]
        if not addrs:
            raise ValueError("give at least one address")
        #: Where reconnects go round when an attempt fails (L{_failover}).
        self._addresses = [parse_address(a) for a in addrs]
        self._address = self._addresses[0]
        self._login = login
        self._token = token
        self._on_push = on_push
        self._on_gap = on_gap
        self._on_kick = on_kick
        self._on_state = on_state
        self._ping_interval = ping_interval
        self._reconnect = reconnect
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self._max_frame = max_frame
        if gate_key is not None and not all(
                a.encrypted_channel for a in self._addresses):
            raise ValueError("gate_key is for tcp+enc:// addresses")
        self._gate_key = (parse_gate_key(gate_key) if gate_key is not None
                          else None)
        if not (isinstance(rekey_frames, int) and rekey_frames >= 1):
            raise ValueError("rekey_frames must be an integer >= 1")
        self._rekey_frames = rekey_frames
        if endpoint_factory is None:
            trust = load_trust_root(ca_file) if ca_file else None
            endpoint_factory = partial(endpoint_for, trust_root=trust,
                                       timeout=connect_timeout)
        self._endpoint_factory = endpoint_factory
        self._random = random.Random()

        self._player_id = None
        self._resume_token = None
        self._last_seq = 0
        self._next_id = 0
        self._started = False
        self._closed = False
        self._connected_d = None
        self._current = None
        self._binding = None
        self._links = set()
        self._attempt = 0
        self._retry_call = None
        self._ack_call = None
        self._pinger = None
        self._handlers = {
            "resp": self._gotResp,
            "err": self._gotErr,
            "push": self._gotPush,
            "gap": self._gotGap,
            "kick": self._gotKick,
            "reconnect": self._gotReconnect,
            "ping": self._gotPing,
            "pong": lambda link, obj: None,
        }

    # Public API

    @property
    def player_id(self):
        """
        The player this client is bound to (C{None} before the first bind).
        """
        return self._player_id

    @property
    def last_seq(self):
        """
        The highest persistent push seq handed to the application (or
        skipped by a gap); what a resume asks the gate to continue after.
        """
        return self._last_seq

    @property
    def connected(self):
        """
        Whether a connection is bound, so that L{request} can send now.
        """
        return self._current is not None and not self._closed

    @property
    def address(self):
        """
        The L{Address} the client (re)connects to; a gate's C{reconnect}
        changes it, and so does a failed attempt when several were given.
        """
        return self._address

    def connect(self):
        """
        Connect and bind; call once.

        @return: a Deferred firing with the C{resp} envelope (a dict with
            C{player_id}, C{resume_token}, C{last_seq}, C{data}) once bound,
            or failing with L{GateError}: the gate's code when it refused the
            login, C{connect_failed} when it could not be reached in
            C{connect_timeout}. The first connection is not retried: a
            client that cannot start is told so at once.
        """
        if self._started:
            raise RuntimeError("connect() may be called only once")
        self._started = True
        self._connected_d = Deferred(self._cancelConnect)
        d = self._connected_d
        self._dial(self._address)
        return d

    def request(self, route, data=None):
        """
        Send a request to the backend route C{route}.

        @return: a Deferred firing with the reply's C{data}, or failing with
            L{GateError}: the gate's or backend's code; C{not_connected} if
            no connection is bound right now (nothing was sent; the
            application may retry once C{on_state} says C{resumed} or
            C{logged_in}); C{connection_lost} if the connection dropped
            before the reply, in which case the request may or may not have
            reached the backend, so only idempotent requests are safe to
            repeat blindly. Cancelling the Deferred only stops waiting.
        """
        if not isinstance(route, str) or not route:
            return fail(TypeError("route must be a non-empty string"))
        link = self._current
        if link is None or self._closed:
            return fail(GateError(errors.NOT_CONNECTED,
                                  "no bound connection to the gate"))
        rid = self._nextId()
        try:
            payload = _encode({"t": "req", "id": rid, "route": route,
                               "data": data})
        except (TypeError, ValueError) as e:
            return fail(e)
        d = Deferred(lambda d: link.pending.pop(rid, None))
        link.pending[rid] = d
        link.sendPayload(payload)
        return d

    def close(self):
        """
        Stop for good: ack what was handed to the application, close every
        connection and cancel every timer. Requests in flight fail with
        C{connection_lost}.

        @return: a Deferred firing when every connection is gone.
        """
        self._shutdown(GateError(errors.CLOSED, "closed by the application"),
                       graceful=True)
        waiters = [link.whenLost() for link in self._links]
        return gatherResults(waiters).addCallback(lambda _: None)

    # Connections

    def _nextId(self):
        self._next_id += 1
        return self._next_id

    def _factoryFor(self, link):
        if link.address.websocket:
            return websocket_factory(self._reactor, link.address.url, link,
                                     self._max_frame, self._connect_timeout)
        if link.address.encrypted_channel:
            return SecureFramedFactory(link, self._max_frame, self._gate_key,
                                       self._rekey_frames)
        return FramedFactory(link, self._max_frame)

    def _dial(self, address):
        link = _Link(self, address)
        self._binding = link
        self._links.add(link)
        self._emit("connecting", addr=str(address))
        link.deadline = self._clock.callLater(self._connect_timeout,
                                              self._bindTimedOut, link)
        try:
            endpoint = self._endpoint_factory(self._reactor, address)
            d = endpoint.connect(self._factoryFor(link))
        except Exception:
            d = fail()
        link.dial = d
        d.addCallbacks(link.dialed, lambda f: self._linkLost(link, f))

    def _bindTimedOut(self, link):
        link.deadline = None
        link.drop(GateError(errors.CONNECT_FAILED,
                            f"not bound within {self._connect_timeout} s"))

    def _linkUp(self, link):
        if self._closed or link.dead:
            link.drop()
            return
        link.heard = self._clock.seconds()
        self._sendBind(link)

    def _sendBind(self, link):
        rid = link.bind_id = self._nextId()
        if self._resume_token is not None:
            link.bind_kind = "resume"
            link.send({"t": "resume", "id": rid, "player_id": self._player_id,
                       "resume_token": self._resume_token,
                       "last_seq": self._last_seq})
        elif self._token is not None:
            link.bind_kind = "auth"
            link.send({"t": "auth", "id": rid, "token": self._token})
        else:
            link.bind_kind = "login"
            link.send({"t": "login", "id": rid, "data": self._login})

    def _bound(self, link, resp):
        if link is not self._binding:
            return
        if link.deadline is not None and link.deadline.active():
            link.deadline.cancel()
        link.deadline = None
        player_id = resp.get("player_id")
        if isinstance(player_id, str):
            self._player_id = player_id
        token = resp.get("resume_token")
        # Without a token a later reconnect can only log in again.
        self._resume_token = token if isinstance(token, str) and token else None
        fresh = link.bind_kind != "resume"
        last = resp.get("last_seq")
        if not fresh and _is_int(last) and last < self._last_seq:
            # The gate has numbered fewer pushes than we handled: the player
            # expired and began again there. Our high-water mark would hide
            # its new pushes, so this is a new stream, as after a login.
            fresh = True
        if fresh:
            # A fresh login starts a new delivery stream: the gate replays
            # nothing on it, and the player's seqs may have restarted if it
            # expired, so an old high-water mark could only hide new pushes.
            self._last_seq = 0
        link.bound = True
        old, self._current = self._current, link
        self._binding = None
        self._attempt = 0
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()  # a retried move that is now done
        self._retry_call = None
        self._startPinging()
        if old is not None:
            old.close()
        if not fresh and self._last_seq:
            self._scheduleAck()
        self._emit("logged_in" if fresh else "resumed",
                   player_id=self._player_id, addr=str(link.address))
        d, self._connected_d = self._connected_d, None
        if d is not None:
            d.callback(resp)

    def _bindRefused(self, link, code, msg):
        if link is not self._binding:
            return
        if link.bind_kind == "resume" and code not in RETRYABLE:
            self.log.info("resume refused ({code}: {msg}); logging in afresh",
                          code=code, msg=msg)
            self._resume_token = None
            self._emit("resume_failed", code=code, msg=msg)
            self._sendBind(link)
            return
        self._binding = None
        error = GateError(code, msg)
        link.drop(error)
        self._bindFailed(link, error, retry=code in RETRYABLE)

    def _bindFailed(self, link, error, retry):
        if self._closed:
            return
        if self._connected_d is not None:
            self._shutdown(error)
        elif self._current is not None:
            info = {}
            if retry and self._reconnect and self._current.moving:
                # The old gate closes that session anyway: try again (its
                # store may have been slow; the claim may even have held).
                delay = self._scheduleRetry()
                if delay is not None:
                    info["delay"] = delay
            self._emit("migration_failed", addr=str(link.address),
                       code=error.code, msg=error.msg, **info)
        elif retry and self._reconnect:
            self._failover(link)
            self._scheduleReconnect()
        else:
            self._shutdown(error)

    def _failover(self, link):
        """
        An attempt at C{link.address} failed: with several addresses, the
        next attempt goes to the next one (after the last, the first; after
        an address a gate's C{reconnect} named, the first).
        """
        addresses = self._addresses
        if len(addresses) < 2 or link.address != self._address:
            return
        try:
            i = addresses.index(link.address)
        except ValueError:
            i = -1
        self._address = addresses[(i + 1) % len(addresses)]

    def _linkLost(self, link, reason):
        if link.finished:
            return
        link.dead = True
        if link.deadline is not None and link.deadline.active():
            link.deadline.cancel()
        link.deadline = None
        self._links.discard(link)
        pending, link.pending = link.pending, {}
        for rid in sorted(pending):
            pending[rid].errback(GateError(
                errors.CONNECTION_LOST,
                "the connection dropped before the reply; the request may "
                "or may not have been processed"))
        if link is self._binding:
            self._binding = None
            error = link.error or GateError(errors.CONNECT_FAILED,
                                            _describe(reason))
            self._bindFailed(link, error, retry=link.kick not in FATAL_KICKS)
        elif link is self._current:
            self._current = None
            self._stopTimers()
            self._lostCurrent(link, reason)
        link.finish()

    def _lostCurrent(self, link, reason):
        if self._closed:
            return
        if link.kick in FATAL_KICKS:
            self._shutdown(GateError(errors.KICKED,
                                     f"{link.kick}: {link.kick_msg}"))
            return
        error = link.error or GateError(errors.CONNECTION_LOST,
                                        _describe(reason))
        self._emit("disconnected", addr=str(link.address), code=error.code,
                   msg=error.msg)
        if self._binding is not None:
            return  # a migration under way takes over
        if self._reconnect:
            self._scheduleReconnect()
        else:
            self._shutdown(error)

    def _scheduleReconnect(self):
        delay = self._scheduleRetry()
        if delay is not None:
            self._emit("reconnecting", addr=str(self._address), delay=delay,
                       attempt=self._attempt)

    def _scheduleRetry(self):
        """
        The next attempt at the current address, after the backoff delay;
        that delay, or C{None} when an attempt is already scheduled.
        """
        if self._retry_call is not None and self._retry_call.active():
            return None
        ceiling = min(self._max_backoff,
                      INITIAL_BACKOFF * 2 ** min(self._attempt, 32))
        delay = ceiling * (0.5 + self._random.random() / 2)
        self._attempt += 1
        self._retry_call = self._clock.callLater(delay, self._retry)
        return delay

    def _retry(self):
        self._retry_call = None
        if not self._closed and self._binding is None:
            self._dial(self._address)

    def _cancelConnect(self, d):
        self._connected_d = None
        self.close()

    def _shutdown(self, error, graceful=False):
        if self._closed:
            return
        if graceful:
            self._sendAck()
        self._closed = True
        self._stopTimers()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._current = self._binding = None
        for link in list(self._links):
            if graceful and link.bound:
                link.close()
            else:
                link.drop(error)
        self._emit("closed", code=error.code, msg=error.msg)
        d, self._connected_d = self._connected_d, None
        if d is not None:
            d.errback(error)

    # Envelopes

    def _payload(self, link, payload):
        link.heard = self._clock.seconds()
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            self.log.warn("gate sent a payload that is not a JSON object; "
                          "dropping the connection")
            link.drop(GateError(errors.PROTOCOL_ERROR,
                                "payload is not a JSON object"))
            return
        handler = self._handlers.get(obj.get("t"))
        if handler is None:
            # Newer gates may add envelope types; ignoring them is the
            # compatible choice.
            self.log.debug("ignoring envelope of type {t!r}", t=obj.get("t"))
            return
        handler(link, obj)

    def _gotResp(self, link, obj):
        rid = obj.get("id")
        if rid is not None and rid == link.bind_id and not link.bound:
            self._bound(link, obj)
            return
        d = link.pending.pop(rid, None)
        if d is not None:
            d.callback(obj.get("data"))

    def _gotErr(self, link, obj):
        rid = obj.get("id")
        code = obj.get("code")
        code = code if isinstance(code, str) else "internal"
        msg = obj.get("msg")
        msg = msg if isinstance(msg, str) else ""
        if rid is not None and rid == link.bind_id and not link.bound:
            self._bindRefused(link, code, msg)
            return
        d = link.pending.pop(rid, None) if rid is not None else None
        if d is not None:
            d.errback(GateError(code, msg))
        else:
            self.log.warn("gate error {code}: {msg}", code=code, msg=msg)

    def _gotPush(self, link, obj):
        seq = obj.get("seq")
        if seq is not None:
            if not _is_int(seq) or seq < 1:
                self.log.warn("ignoring push with bad seq {seq!r}", seq=seq)
                return
            if seq <= self._last_seq:
                return  # replayed by a resume; the application has it
            self._last_seq = seq
        ts = obj.get("ts")
        push = Push(obj.get("route"), obj.get("data"),
                    ts if isinstance(ts, (int, float)) else None, seq)
        self._call(self._on_push, push)
        if seq is not None:
            self._scheduleAck()

    def _gotGap(self, link, obj):
        first, last = obj.get("from"), obj.get("to")
        if not (_is_int(first) and _is_int(last)) or last < first:
            self.log.warn("ignoring malformed gap {first!r}..{last!r}",
                          first=first, last=last)
            return
        if last <= self._last_seq:
            return  # the application already has all of these
        first = max(first, self._last_seq + 1)
        self._last_seq = last
        self._call(self._on_gap, first, last)
        self._scheduleAck()

    def _gotKick(self, link, obj):
        if link is not self._current and link is not self._binding:
            return
        reason = obj.get("reason")
        msg = obj.get("msg", "")
        if (reason == "replaced" and link is self._current
                and (self._binding is not None or link.moving)):
            # Our own resume at the address we were sent to took over (or
            # did, though its answer was an error): go on moving.
            return
        link.kick = reason
        link.kick_msg = msg if isinstance(msg, str) else ""
        self._call(self._on_kick, reason, msg)

    def _gotReconnect(self, link, obj):
        if link is not self._current:
            return
        try:
            address = parse_address(obj.get("addr"), relative_to=link.address)
        except ValueError as e:
            self.log.warn("ignoring reconnect to a bad address: {e}", e=e)
            return
        # From now on this is where the session lives, also for plain
        # reconnects should the move itself fail.
        self._address = address
        link.moving = True
        if self._binding is not None:
            stale, self._binding = self._binding, None
            stale.drop()
        self._emit("migrating", addr=str(address), reason=obj.get("reason"))
        self._dial(address)

    def _gotPing(self, link, obj):
        pong = {"t": "pong"}
        if "ts" in obj:
            pong["ts"] = obj["ts"]
        link.send(pong)

    # Timers

    def _startPinging(self):
        if self._pinger is None and self._ping_interval:
            self._pinger = LoopingCall(self._ping)
            self._pinger.clock = self._clock
            self._pinger.start(self._ping_interval, now=False)

    def _ping(self):
        link = self._current
        if link is None:
            return
        now = self._clock.seconds()
        if now - link.heard >= SILENT_INTERVALS * self._ping_interval:
            self.log.info("gate silent for {s:.0f} s; reconnecting",
                          s=now - link.heard)
            link.drop(GateError(errors.CONNECTION_LOST,
                                "the gate stopped answering"))
            return
        link.send({"t": "ping", "ts": now})

    def _scheduleAck(self):
        if self._ack_call is None:
            self._ack_call = self._clock.callLater(ACK_DELAY, self._sendAck)

    def _sendAck(self):
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        link = self._current
        if link is not None and self._last_seq > link.acked:
            link.acked = self._last_seq
            link.send({"t": "ack", "seq": self._last_seq})

    def _stopTimers(self):
        if self._pinger is not None:
            if self._pinger.running:
                self._pinger.stop()
            self._pinger = None
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None

    # Callbacks

    def _emit(self, state, **info):
        self.log.debug("{state} {info}", state=state, info=info)
        self._call(self._on_state, state, info)

    def _call(self, callback, *args):
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            self.log.failure("client callback {callback!r} raised",
                             callback=callback)
