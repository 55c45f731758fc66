"""
The embedded store: player directory and mailboxes in this process's memory.

The default, so one gate runs with nothing else installed; it is lost when
the process stops and is not shared between gates.
"""

import secrets

from twisted.internet.defer import succeed
from zope.interface import implementer

from gate.interfaces import IClusterBus, IMailboxStore, IPlayerDirectory
from gate.mailbox import Mailbox
from gate.player import Claim, Location


@implementer(IMailboxStore)
class MemoryMailboxStore:
    """
    Mailboxes in a dict, one L{Mailbox} per player that has one.

    @param clock: an L{IReactorTime} for age-based retention.
    """

    def __init__(self, clock, max_entries, max_age):
        self._clock = clock
        self._max_entries = max_entries
        self._max_age = max_age
        self._boxes = {}

    def _box(self, player_id):
        box = self._boxes.get(player_id)
        if box is None:
            box = self._boxes[player_id] = Mailbox(self._max_entries,
                                                   self._max_age)
        return box

    def append(self, player_ids, route, data, ts):
        now = self._clock.seconds()
        entries = []
        for player_id in player_ids:
            box = self._box(player_id)
            box.expire(now)
            entries.append(box.append(route, data, ts))
        return succeed(entries)

    def read_after(self, player_id, last_seq):
        box = self._boxes.get(player_id)
        if box is None:
            return succeed((None, []))
        return succeed(box.read_after(last_seq, self._clock.seconds()))

    def ack(self, player_id, seq):
        box = self._boxes.get(player_id)
        if box is not None:
            box.ack(seq)
        return succeed(None)

    def last_seq(self, player_id):
        box = self._boxes.get(player_id)
        return succeed(box.last_seq if box is not None else 0)

    def size(self, player_id):
        box = self._boxes.get(player_id)
        if box is None:
            return succeed(0)
        box.expire(self._clock.seconds())
        return succeed(len(box))

    def drop(self, player_id):
        self._boxes.pop(player_id, None)
        return succeed(None)

    def total(self):
        """
        All retained pushes, for the mailbox gauge.
        """
        return sum(len(box) for box in self._boxes.values())


@implementer(IPlayerDirectory)
class MemoryPlayerDirectory:
    """
    Player locations of this one gate, with each player's incarnation
    (C{epoch}), made when the player is first claimed and kept until it is
    forgotten.
    """

    def __init__(self):
        self._players = {}

    def claim(self, player_id, gate_id, session_id, now, epoch=None,
              issued=None):
        previous = self._players.get(player_id)
        if previous is None:
            if epoch is not None:
                return succeed(None)
            current = secrets.token_hex(8)
        elif epoch is not None and epoch != previous.epoch:
            return succeed(None)
        else:
            current = previous.epoch
        self._players[player_id] = Location(player_id, gate_id, session_id,
                                            now, current)
        if previous is not None and previous.session_id is None:
            previous = None
        return succeed(Claim(previous, current, 0))

    def release(self, player_id, gate_id, session_id, now):
        current = self._players.get(player_id)
        if (current is None or current.session_id != session_id
                or current.gate_id != gate_id):
            return succeed(False)
        self._players[player_id] = current._replace(session_id=None,
                                                    since=now)
        return succeed(True)

    def lookup(self, player_id):
        return succeed(self._players.get(player_id))

    def forget(self, player_id):
        self._players.pop(player_id, None)
        return succeed(None)

    def expire(self, player_id, gate_id, epoch):
        current = self._players.get(player_id)
        if (current is None or current.session_id is not None
                or current.gate_id != gate_id or current.epoch != epoch):
            return succeed(False)
        del self._players[player_id]
        return succeed(True)


@implementer(IClusterBus)
class MemoryClusterBus:
    """
    The bus of a gate alone: nothing to reach, so nothing is shared and the
    player manager routes every push, kick and reconnect itself.
    """

    shared = False
    reachable = True

    def listen(self, gate_id, receiver):
        return succeed(None)

    def place(self, gate_id, player_ids, head, ts, persist):
        return succeed([("unknown", 0) for _ in player_ids])

    def send_to_player(self, player_id, op, payload):
        return succeed(False)

    def send_to_gate(self, gate_id, header, payload):
        return succeed(False)

    def broadcast(self, gate_id, payload):
        return succeed({})

    def heartbeat(self, gate_id, online):
        return succeed(None)

    def refresh(self, gate_id, players):
        return succeed(["ok" for _ in players])

    def info(self, player_id):
        return succeed(None)

    def adopt(self, gate_id, now):
        return succeed([])

    def stop(self, gate_id):
        return succeed(None)
