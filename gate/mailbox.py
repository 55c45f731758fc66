"""
A player's mailbox: the persistent pushes kept for resume (PROTOCOL.md
section 3).

L{Mailbox} is the plain, synchronous bookkeeping; the stores in
C{mmogate_plugins} put it (or an equivalent) behind L{IMailboxStore}.
"""

from collections import deque


class Entry:
    """
    One persistent push as stored: its number, time and content.
    """

    __slots__ = ("seq", "ts", "route", "data")

    def __init__(self, seq, ts, route, data):
        self.seq = seq
        self.ts = ts
        self.route = route
        self.data = data

    def __repr__(self):
        return f"Entry({self.seq}, {self.ts}, {self.route!r}, {self.data!r})"

    def __eq__(self, other):
        return isinstance(other, Entry) and (
            (self.seq, self.ts, self.route, self.data)
            == (other.seq, other.ts, other.route, other.data))

    def as_dict(self):
        return {"t": "push", "route": self.route, "data": self.data,
                "ts": self.ts, "seq": self.seq}


class Mailbox:
    """
    Numbered pushes of one player, bounded by count and by age.

    C{floor} is the highest seq known to be gone (acked or dropped); pushes
    above it that are not retained were dropped by retention, which is what
    a resuming client learns as a C{gap}.

    @param max_entries: C{player.mailbox_max}.
    @param max_age: C{player.idle_timeout}; older pushes are dropped.
    """

    def __init__(self, max_entries, max_age):
        self.max_entries = max_entries
        self.max_age = max_age
        self.entries = deque()
        self.last_seq = 0
        # Highest seq acknowledged by the client; anything above it that is
        # no longer retained was lost to retention.
        self.acked = 0

    def append(self, route, data, ts):
        self.last_seq += 1
        entry = Entry(self.last_seq, ts, route, data)
        self.entries.append(entry)
        if len(self.entries) > self.max_entries:
            self.entries.popleft()
        return entry

    def expire(self, now):
        """
        Drop pushes older than C{max_age}.
        """
        entries = self.entries
        limit = now - self.max_age
        while entries and entries[0].ts <= limit:
            entries.popleft()

    def read_after(self, last_seq, now):
        """
        @return: C{(gap, entries)} as L{IMailboxStore.read_after} describes.
        """
        self.expire(now)
        entries = [e for e in self.entries if e.seq > last_seq] \
            if self.entries and self.entries[0].seq <= last_seq \
            else list(self.entries)
        first_kept = entries[0].seq if entries else self.last_seq + 1
        # Pushes after last_seq that the client never acked and that are not
        # retained any more: retention dropped them.
        start = max(last_seq, self.acked) + 1
        gap = None
        if start < first_kept and start <= self.last_seq:
            gap = (start, min(first_kept - 1, self.last_seq))
        return gap, entries

    def ack(self, seq):
        seq = min(seq, self.last_seq)
        if seq > self.acked:
            self.acked = seq
        entries = self.entries
        while entries and entries[0].seq <= seq:
            entries.popleft()

    def __len__(self):
        return len(self.entries)
