"""
The session audit log: who connected, logged in, resumed, was kicked,
disconnected or expired, on which gate, from where and why.

L{MemoryAuditLog} is what every gate has without PostgreSQL: the last
events in a ring buffer, so C{GET /v1/history} answers on one gate with
nothing installed. C{mmogate_plugins.postgres} keeps them durably. It lives
here rather than in C{mmogate_plugins.memory} because the session and player
managers default to it, and that module imports L{gate.player}.
"""

from collections import deque

from twisted.internet.defer import succeed
from zope.interface import implementer

from gate.interfaces import IAuditLog

#: The events recorded, in the order a session's life has them.
EVENTS = ("connect", "login", "resume", "kick", "disconnect", "expiry")

#: Events the in-memory log keeps when no limit is given (store.audit_max).
DEFAULT_KEEP = 10000

FIELDS = ("event", "player_id", "session_id", "gate_id", "peer", "reason",
          "ts")


def as_record(row):
    """
    The dict C{history} answers for one C{(event, player_id, ..., ts)} row.
    """
    return dict(zip(FIELDS, row))


def matches(row, player_id, session_id):
    return ((player_id is None or row[1] == player_id)
            and (session_id is None or row[2] == session_id))


@implementer(IAuditLog)
class MemoryAuditLog:
    """
    The last C{keep} events of this gate, newest last; older ones are
    forgotten, which is the point: it costs a bounded amount of memory.
    """

    def __init__(self, keep=DEFAULT_KEEP):
        self._rows = deque(maxlen=keep)

    def record(self, event, player_id, session_id, gate_id, peer, reason, ts):
        self._rows.append((event, player_id, session_id, gate_id, peer,
                           reason, ts))

    def history(self, player_id=None, session_id=None, limit=100):
        found = []
        for row in reversed(self._rows):
            if len(found) >= limit:
                break
            if matches(row, player_id, session_id):
                found.append(as_record(row))
        return succeed(found)

    def __len__(self):
        return len(self._rows)
