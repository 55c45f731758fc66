"""
Moving clients to another gate (PROTOCOL.md sections 2 and 5): C{reconnect}
envelopes spread over C{drain.jitter} seconds, so that the gate they go to is
not hit by every client at once, and the drain of a gate (refuse new
clients, move every session, stop once empty or at the deadline).

Plain objects on an injected clock and random source. The per-session part
(finish the request lane, flush, send C{reconnect}, close after
C{drain.close_after}) is L{gate.session.Session.send_reconnect}.
Tests: C{tests/test_drain.py}.
"""

import random as _random
from collections import deque
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger

#: Longest address accepted for a C{reconnect}.
MAX_ADDR = 512
#: Longest transport name accepted as a key of C{addrs}.
MAX_TRANSPORT = 32
#: The key of a reconnect target that stands for every other transport.
ANY_TRANSPORT = "*"


class NotRunning(Exception):
    """
    The gate is stopping (or not started): it cannot begin a drain.
    """


def check_addr(addr, name="addr"):
    """
    C{addr} if a C{reconnect} envelope may carry it: C{host:port}, or a
    C{ws://} or C{wss://} URL (PROTOCOL.md section 2).

    @raise ValueError: saying what is wrong, naming the field C{name}.
    """
    shape = (f"'{name}' must be host:port or a ws:// or wss:// URL, "
             f"at most {MAX_ADDR} characters")
    if not isinstance(addr, str) or not addr or len(addr) > MAX_ADDR:
        raise ValueError(shape)
    if addr != addr.strip() or any(c.isspace() or ord(c) < 32 for c in addr):
        raise ValueError(f"'{name}' must not contain spaces or control "
                         f"characters")
    if "://" in addr:
        parts = urlsplit(addr)
        if parts.scheme.lower() not in ("ws", "wss"):
            raise ValueError(shape)
    else:
        parts = urlsplit("//" + addr)
        if parts.path or parts.query or parts.fragment:
            raise ValueError(shape)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"'{name}' has a bad port: {addr!r}") from None
    if not parts.hostname:
        raise ValueError(f"'{name}' has no host: {addr!r}")
    if "://" not in addr and not port:
        raise ValueError(f"'{name}' needs a port (1-65535): {addr!r}")
    return addr


def check_target(addr, addrs=None):
    """
    The reconnect target of an API body: C{addr}, or, with C{addrs} (an
    object of transport name to address, such as C{{"ws":
    "wss://b.example/ws"}}), a dict of those with C{"*"} for C{addr}.

    @raise ValueError: naming the bad field.
    """
    addr = check_addr(addr)
    if addrs is None:
        return addr
    if not isinstance(addrs, dict) or len(addrs) > 16:
        raise ValueError("'addrs' must be an object of at most 16 transport "
                         "names (tcp, ws, ...) to addresses")
    target = {ANY_TRANSPORT: addr}
    for transport, value in addrs.items():
        if not transport or len(transport) > MAX_TRANSPORT \
                or transport == ANY_TRANSPORT:
            raise ValueError(f"'addrs' has a bad transport name "
                             f"{transport[:MAX_TRANSPORT]!r}")
        target[transport] = check_addr(value, f"addrs.{transport}")
    return target


def address_for(target, transport):
    """
    The address a session on C{transport} is sent to by C{target} (see
    L{check_target}).
    """
    if isinstance(target, dict):
        return target.get(transport) or target[ANY_TRANSPORT]
    return target


#: Longest drain deadline accepted: a year.
MAX_DEADLINE = 365 * 86400


def check_deadline(deadline):
    """
    C{deadline} in seconds as a float: a finite number >= 0.

    @raise ValueError: otherwise.
    """
    # Compared, not math.isfinite(): that raises on an int too large for a
    # float (tests/test_fuzz.py found it), and so would float() below.
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) \
            or not 0 <= deadline <= MAX_DEADLINE:
        raise ValueError(f"'deadline' must be a number of seconds from 0 to "
                         f"{MAX_DEADLINE}")
    return float(deadline)


class Spread:
    """
    Calls C{send(item)} for each of C{items} at a moment drawn uniformly
    from the next C{window} seconds, with one timer however many items, so
    a thousand sessions do not reconnect in the same instant.

    @param random: returns a float in [0, 1).
    """

    def __init__(self, clock, items, window, send, random):
        self._clock = clock
        self._send = send
        now = clock.seconds()
        due = [(now + random() * window, n, item)
               for n, item in enumerate(items)]
        due.sort()  # n is unique: items themselves are never compared
        self._due = deque(due)
        self._call = None
        self.done = Deferred()
        self._schedule()

    @property
    def pending(self):
        """
        Items not yet handed to C{send}.
        """
        return len(self._due)

    def _schedule(self):
        if not self._due:
            if not self.done.called:
                self.done.callback(None)
            return
        delay = max(0.0, self._due[0][0] - self._clock.seconds())
        self._call = self._clock.callLater(delay, self._fire)

    def _fire(self):
        self._call = None
        now = self._clock.seconds()
        # The first is due (its timer fired); the rest up to now with it.
        _, _, item = self._due.popleft()
        self._send(item)
        while self._due and self._due[0][0] <= now:
            _, _, item = self._due.popleft()
            self._send(item)
        self._schedule()

    def cancel(self):
        """
        Send nothing more.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._due.clear()


class Drainer:
    """
    Sends C{reconnect} to this gate's sessions, and drains the gate.

    @param sessions: the L{gate.session.SessionManager}.
    @param jitter: C{drain.jitter}, the window reconnects are spread over.
    @param random: returns a float in [0, 1) (default: L{random.random}).
    """

    log = Logger()

    def __init__(self, clock, sessions, jitter, random=None):
        self._clock = clock
        self._sessions = sessions
        self.jitter = jitter
        self._random = random if random is not None else \
            _random.Random().random
        self._spreads = set()
        self._deadline = None
        self._done = None
        #: Set once L{drain} was called: the C{(target, deadline)} it had.
        self.drain_target = None

    @property
    def draining(self):
        return self.drain_target is not None

    def reconnect_all(self, target, reason, window=None):
        """
        Tell every session of this gate (bound to a player or not) to
        reconnect to C{target}, each at a random moment within C{window}
        seconds (default C{drain.jitter}). Sessions already told are left
        alone.

        @return: how many sessions will be told.
        """
        window = self.jitter if window is None else window
        sessions = [s for s in self._sessions.sessions.values()
                    if not (s.moving or s.closing or s.closed)]

        def send(session):
            session.send_reconnect(address_for(target, session.transport_name),
                                   reason)

        spread = Spread(self._clock, sessions, window, send, self._random)
        if spread.pending:
            self._spreads.add(spread)
            spread.done.addCallback(lambda _: self._spreads.discard(spread))
        self.log.info("reconnect ({reason}) of {n} sessions to {target} "
                      "spread over {window}s", reason=reason, n=len(sessions),
                      target=target, window=window)
        return len(sessions)

    def drain(self, target, deadline):
        """
        Refuse new sessions and move every session to C{target}, spread
        over C{drain.jitter} seconds but no longer than C{deadline}.

        @return: L{Deferred} firing with C{"empty"} once no session is left,
            or C{"deadline"} when C{deadline} seconds have passed.
        """
        if self.draining:
            raise RuntimeError("already draining")
        self.drain_target = (target, deadline)
        self._sessions.accepting = False
        done = self._done = Deferred()
        self._deadline = self._clock.callLater(deadline, self._finish,
                                               "deadline")
        self.reconnect_all(target, "drain", window=min(self.jitter, deadline))
        self._sessions.wait_empty().addCallback(
            lambda _: self._finish("empty"))
        return done

    def _finish(self, why):
        done = self._done
        if done is None or done.called:
            return
        self.log.info("drain finished: {why}", why=why)
        self._cancel()
        done.callback(why)

    def _cancel(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        for spread in list(self._spreads):
            spread.cancel()
        self._spreads.clear()

    def stop(self):
        """
        The gate is stopping anyway: cancel timers, send nothing more. A
        drain under way does not report its end.
        """
        self._done = None
        self._cancel()
