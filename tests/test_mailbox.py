"""
Tests for L{gate.mailbox} and the in-memory L{IMailboxStore}: numbering,
retention by count and age, acks and the gaps a resuming client is told of
(PROTOCOL.md section 3).
"""

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from gate.interfaces import IMailboxStore
from gate.mailbox import Entry, Mailbox
from mmogate_plugins.memory import MemoryMailboxStore
from tests.mailbox_contract import MailboxStoreContract


def seqs(entries):
    return [e.seq for e in entries]


class EntryTests(SynchronousTestCase):
    def test_as_dict(self):
        self.assertEqual(Entry(3, 1.5, "r", {"a": 1}).as_dict(),
                         {"t": "push", "route": "r", "data": {"a": 1},
                          "ts": 1.5, "seq": 3})

    def test_equality(self):
        self.assertEqual(Entry(1, 2.0, "r", [1]), Entry(1, 2.0, "r", [1]))
        self.assertNotEqual(Entry(1, 2.0, "r", [1]), Entry(2, 2.0, "r", [1]))
        self.assertNotEqual(Entry(1, 2.0, "r", [1]), (1, 2.0, "r", [1]))


class MailboxTests(SynchronousTestCase):
    def fill(self, box, n, ts=0.0):
        return [box.append("r", i, ts) for i in range(n)]

    def test_seq_starts_at_one_and_grows_by_one(self):
        box = Mailbox(100, 1000)
        self.assertEqual(box.last_seq, 0)
        self.assertEqual(seqs(self.fill(box, 5)), [1, 2, 3, 4, 5])
        self.assertEqual(box.last_seq, 5)

    def test_seq_continues_across_drops_and_acks(self):
        box = Mailbox(2, 1000)
        self.fill(box, 5)
        box.ack(5)
        self.assertEqual(len(box), 0)
        self.assertEqual(box.append("r", None, 0.0).seq, 6)
        box.expire(5000)
        self.assertEqual(box.append("r", None, 5000.0).seq, 7)

    def test_read_everything(self):
        box = Mailbox(100, 1000)
        self.fill(box, 3)
        gap, entries = box.read_after(0, 0)
        self.assertIsNone(gap)
        self.assertEqual(seqs(entries), [1, 2, 3])
        self.assertEqual([e.data for e in entries], [0, 1, 2])

    def test_read_after(self):
        box = Mailbox(100, 1000)
        self.fill(box, 5)
        for last, expected in ((0, [1, 2, 3, 4, 5]), (2, [3, 4, 5]),
                               (4, [5]), (5, []), (99, [])):
            gap, entries = box.read_after(last, 0)
            self.assertIsNone(gap)
            self.assertEqual(seqs(entries), expected, last)

    def test_empty(self):
        self.assertEqual(Mailbox(10, 10).read_after(0, 0), (None, []))

    def test_retention_by_count(self):
        """
        Beyond C{max_entries} the oldest pushes go, and a client that has not
        seen them gets a gap for exactly those.
        """
        box = Mailbox(3, 1000)
        self.fill(box, 7)
        self.assertEqual(len(box), 3)
        gap, entries = box.read_after(0, 0)
        self.assertEqual(gap, (1, 4))
        self.assertEqual(seqs(entries), [5, 6, 7])
        self.assertEqual(box.read_after(2, 0)[0], (3, 4))
        self.assertEqual(box.read_after(3, 0)[0], (4, 4))
        self.assertEqual(box.read_after(4, 0), (None, box.read_after(4, 0)[1]))
        self.assertEqual(seqs(box.read_after(4, 0)[1]), [5, 6, 7])
        self.assertEqual(box.read_after(6, 0), (None, [box.entries[-1]]))

    def test_retention_by_age(self):
        """
        Pushes as old as C{max_age} are dropped when read.
        """
        box = Mailbox(100, 60)
        box.append("r", "old", 0.0)
        box.append("r", "mid", 30.0)
        box.append("r", "new", 59.0)
        gap, entries = box.read_after(0, 59.9)
        self.assertIsNone(gap)
        self.assertEqual(seqs(entries), [1, 2, 3])
        gap, entries = box.read_after(0, 60.0)
        self.assertEqual(gap, (1, 1))
        self.assertEqual(seqs(entries), [2, 3])
        gap, entries = box.read_after(0, 119.0)
        self.assertEqual(gap, (1, 3))
        self.assertEqual(entries, [])

    def test_expire(self):
        box = Mailbox(100, 10)
        box.append("r", None, 0.0)
        box.append("r", None, 5.0)
        box.expire(10.0)
        self.assertEqual(seqs(box.entries), [2])
        box.expire(14.9)
        self.assertEqual(len(box), 1)
        box.expire(15.0)
        self.assertEqual(len(box), 0)
        self.assertEqual(box.last_seq, 2)

    def test_ack_trims(self):
        box = Mailbox(100, 1000)
        self.fill(box, 5)
        box.ack(3)
        self.assertEqual(seqs(box.entries), [4, 5])
        self.assertEqual(box.acked, 3)
        box.ack(1)
        self.assertEqual(seqs(box.entries), [4, 5])
        self.assertEqual(box.acked, 3)

    def test_ack_beyond_last_seq(self):
        """
        Acking a seq not yet assigned acks only what exists: later pushes
        are still kept and still delivered.
        """
        box = Mailbox(100, 1000)
        self.fill(box, 2)
        box.ack(10)
        self.assertEqual(box.acked, 2)
        self.assertEqual(len(box), 0)
        box.append("r", "after", 0.0)
        self.assertEqual(box.read_after(2, 0), (None, [Entry(3, 0.0, "r", "after")]))

    def test_no_gap_for_acked(self):
        """
        Acked pushes were received: reading from before the ack reports no
        gap for them.
        """
        box = Mailbox(100, 1000)
        self.fill(box, 5)
        box.ack(3)
        gap, entries = box.read_after(0, 0)
        self.assertIsNone(gap)
        self.assertEqual(seqs(entries), [4, 5])

    def test_gap_after_acks_and_count_drop(self):
        box = Mailbox(2, 1000)
        self.fill(box, 3)
        box.ack(1)
        self.fill(box, 3)
        # Retained: 5, 6; acked: 1; dropped unacked: 2..4.
        gap, entries = box.read_after(0, 0)
        self.assertEqual(gap, (2, 4))
        self.assertEqual(seqs(entries), [5, 6])
        self.assertEqual(box.read_after(3, 0)[0], (4, 4))

    def test_gap_after_full_drop(self):
        """
        When retention dropped everything, the gap runs to the last seq
        assigned.
        """
        box = Mailbox(100, 10)
        self.fill(box, 4, ts=0.0)
        self.assertEqual(box.read_after(1, 100.0), ((2, 4), []))
        box.ack(2)
        self.assertEqual(box.read_after(0, 100.0), ((3, 4), []))
        self.assertEqual(box.read_after(4, 100.0), (None, []))
        self.assertEqual(box.read_after(9, 100.0), (None, []))

    def test_gap_after_full_drop_by_count_of_acked(self):
        box = Mailbox(3, 1000)
        self.fill(box, 3)
        box.ack(3)
        self.assertEqual(box.read_after(0, 0), (None, []))


class MemoryStoreTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = MemoryMailboxStore(self.clock, 3, 100)

    def result(self, d):
        return self.successResultOf(d)

    def first(self, d):
        [entry] = self.successResultOf(d)
        return entry

    def test_append_many(self):
        """
        One append numbers the push for every player given, in order.
        """
        self.store.append(["a"], "r", 0, 0.0)
        entries = self.result(self.store.append(["a", "b", "c"], "r", 1, 0.0))
        self.assertEqual([(e.seq, e.data) for e in entries],
                         [(2, 1), (1, 1), (1, 1)])

    def test_interface(self):
        self.assertTrue(verifyObject(IMailboxStore, self.store))

    def test_append_numbers_per_player(self):
        a1 = self.first(self.store.append(["a"], "r", 1, 0.0))
        a2 = self.first(self.store.append(["a"], "r", 2, 0.0))
        b1 = self.first(self.store.append(["b"], "r", 3, 0.0))
        self.assertEqual((a1.seq, a2.seq, b1.seq), (1, 2, 1))
        self.assertEqual(a1, Entry(1, 0.0, "r", 1))

    def test_unknown_player(self):
        self.assertEqual(self.result(self.store.read_after("x", 0)), (None, []))
        self.assertEqual(self.result(self.store.last_seq("x")), 0)
        self.assertEqual(self.result(self.store.size("x")), 0)
        self.assertIsNone(self.result(self.store.ack("x", 5)))
        self.assertIsNone(self.result(self.store.drop("x")))

    def test_count_and_gap(self):
        for i in range(5):
            self.store.append(["a"], "r", i, 0.0)
        self.assertEqual(self.result(self.store.size("a")), 3)
        self.assertEqual(self.result(self.store.last_seq("a")), 5)
        gap, entries = self.result(self.store.read_after("a", 0))
        self.assertEqual(gap, (1, 2))
        self.assertEqual(seqs(entries), [3, 4, 5])

    def test_age_uses_clock(self):
        self.store.append(["a"], "r", 1, self.clock.seconds())
        self.clock.advance(50)
        self.store.append(["a"], "r", 2, self.clock.seconds())
        self.clock.advance(50)
        self.assertEqual(self.result(self.store.size("a")), 1)
        gap, entries = self.result(self.store.read_after("a", 0))
        self.assertEqual((gap, seqs(entries)), ((1, 1), [2]))
        self.clock.advance(50)
        self.assertEqual(self.result(self.store.read_after("a", 0)),
                         ((1, 2), []))
        self.assertEqual(self.result(self.store.last_seq("a")), 2)

    def test_append_expires_old(self):
        self.store.append(["a"], "r", 1, 0.0)
        self.clock.advance(100)
        self.store.append(["a"], "r", 2, 100.0)
        self.assertEqual(self.store.total(), 1)

    def test_ack(self):
        for i in range(3):
            self.store.append(["a"], "r", i, 0.0)
        self.store.ack("a", 2)
        self.assertEqual(self.result(self.store.size("a")), 1)
        self.assertEqual(self.result(self.store.read_after("a", 0)),
                         (None, [Entry(3, 0.0, "r", 2)]))

    def test_drop(self):
        self.store.append(["a"], "r", 1, 0.0)
        self.store.append(["b"], "r", 1, 0.0)
        self.store.drop("a")
        self.assertEqual(self.result(self.store.last_seq("a")), 0)
        self.assertEqual(self.result(self.store.size("a")), 0)
        self.assertEqual(self.store.total(), 1)
        self.assertEqual(self.first(self.store.append(["a"], "r", 1, 0.0)).seq, 1)

    def test_total(self):
        self.assertEqual(self.store.total(), 0)
        for player in ("a", "b"):
            for i in range(5):
                self.store.append([player], "r", i, 0.0)
        self.assertEqual(self.store.total(), 6)


class MemoryStoreContractTests(MailboxStoreContract, TestCase):
    """
    The contract every mailbox store owes the gate
    (L{tests.mailbox_contract}), for the in-memory one.
    """

    def setUp(self):
        self.clock = Clock()

    def make_store(self, max_entries, max_age):
        return succeed(MemoryMailboxStore(self.clock, max_entries, max_age))
