"""
The behaviour every L{IMailboxStore} owes the gate (PROTOCOL.md section 3),
as one set of tests that runs against each store: numbering, retention by
count and age, acks, the gaps a resuming client is told of, drop, and the
order in which results arrive.

Use: mix L{MailboxStoreContract} into a C{twisted.trial.unittest.TestCase}
that sets C{self.clock} (a C{task.Clock} the store reads "now" from) and
defines C{make_store(max_entries, max_age)} returning a L{Deferred} that
fires with a fresh, empty store. Pushes are stamped with
C{self.clock.seconds()}, as the gate does.
"""

from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyObject

from gate.interfaces import IMailboxStore
from gate.mailbox import Entry


def seqs(entries):
    return [e.seq for e in entries]


class MailboxStoreContract:
    """
    Tests of an L{IMailboxStore}; see the module docstring.
    """

    async def store_of(self, max_entries=100, max_age=1000.0):
        return await self.make_store(max_entries, max_age)

    async def fill(self, store, player_id, n, ts=None):
        entries = []
        for i in range(n):
            [entry] = await store.append(
                [player_id], "r", i,
                self.clock.seconds() if ts is None else ts)
            entries.append(entry)
        return entries

    async def test_interface(self):
        store = await self.store_of()
        self.assertTrue(verifyObject(IMailboxStore, store))

    async def test_seq_starts_at_one_and_grows_by_one(self):
        store = await self.store_of()
        self.assertEqual(await store.last_seq("a"), 0)
        self.assertEqual(seqs(await self.fill(store, "a", 5)),
                         [1, 2, 3, 4, 5])
        self.assertEqual(await store.last_seq("a"), 5)

    async def test_append_many(self):
        """
        One append numbers the push for every player given, in order.
        """
        store = await self.store_of()
        await store.append(["a"], "r", 0, 0.0)
        entries = await store.append(["a", "b", "c"], "r", 1, 0.0)
        self.assertEqual([(e.seq, e.data) for e in entries],
                         [(2, 1), (1, 1), (1, 1)])
        self.assertEqual(await store.last_seq("c"), 1)

    async def test_append_nobody(self):
        store = await self.store_of()
        self.assertEqual(list(await store.append([], "r", 1, 0.0)), [])

    async def test_append_repeated_player(self):
        """
        A player listed twice gets the push twice, numbered in turn.
        """
        store = await self.store_of()
        entries = await store.append(["a", "b", "a"], "r", "x", 0.0)
        self.assertEqual(seqs(entries), [1, 1, 2])
        self.assertEqual(seqs((await store.read_after("a", 0))[1]), [1, 2])

    async def test_entries_round_trip(self):
        """
        What is read back equals what was stored: route, ts and any JSON.
        """
        store = await self.store_of()
        values = [None, True, 3, 2.5, "héllo \u2603 \\u0000", [1, [2]],
                  {"a": {"b": [None, "c"]}, "n": -1e-3}, "", {}]
        stored = []
        for i, value in enumerate(values):
            [entry] = await store.append(["p"], f"route.{i}", value,
                                         1000.25 + i)
            stored.append(entry)
        self.assertEqual(stored[1], Entry(2, 1001.25, "route.1", True))
        gap, entries = await store.read_after("p", 0)
        self.assertIsNone(gap)
        self.assertEqual(entries, stored)
        self.assertEqual([e.data for e in entries], values)

    async def test_unknown_player(self):
        store = await self.store_of()
        self.assertEqual(await store.read_after("x", 0), (None, []))
        self.assertEqual(await store.last_seq("x"), 0)
        self.assertEqual(await store.size("x"), 0)
        self.assertIsNone(await store.ack("x", 5))
        self.assertIsNone(await store.drop("x"))
        self.assertEqual(await store.last_seq("x"), 0)

    async def test_read_after(self):
        store = await self.store_of()
        await self.fill(store, "a", 5)
        await self.fill(store, "b", 1)
        for last, expected in ((0, [1, 2, 3, 4, 5]), (2, [3, 4, 5]),
                               (4, [5]), (5, []), (99, [])):
            gap, entries = await store.read_after("a", last)
            self.assertIsNone(gap)
            self.assertEqual(seqs(entries), expected, last)
        gap, entries = await store.read_after("a", 3)
        self.assertEqual([e.data for e in entries], [3, 4])

    async def test_retention_by_count(self):
        """
        Beyond C{max_entries} the oldest pushes go, and a client that has
        not seen them gets a gap for exactly those.
        """
        store = await self.store_of(max_entries=3)
        await self.fill(store, "a", 7)
        self.assertEqual(await store.size("a"), 3)
        self.assertEqual(await store.last_seq("a"), 7)
        gap, entries = await store.read_after("a", 0)
        self.assertEqual(gap, (1, 4))
        self.assertEqual(seqs(entries), [5, 6, 7])
        self.assertEqual((await store.read_after("a", 2))[0], (3, 4))
        self.assertEqual((await store.read_after("a", 3))[0], (4, 4))
        gap, entries = await store.read_after("a", 4)
        self.assertEqual((gap, seqs(entries)), (None, [5, 6, 7]))
        gap, entries = await store.read_after("a", 6)
        self.assertEqual((gap, seqs(entries)), (None, [7]))

    async def test_retention_by_count_at_once(self):
        """
        Pushes asked for together (which a networked store may write in
        one go) are kept within C{max_entries} like any others.
        """
        store = await self.store_of(max_entries=3)
        ds = [store.append(["a"], "r", i, 0.0) for i in range(10)]
        ds.append(store.append(["a", "b", "a"], "r", "twice", 0.0))
        await gatherResults(ds)
        self.assertEqual(await store.size("a"), 3)
        self.assertEqual(await store.last_seq("a"), 12)
        gap, entries = await store.read_after("a", 0)
        self.assertEqual(gap, (1, 9))
        self.assertEqual([(e.seq, e.data) for e in entries],
                         [(10, 9), (11, "twice"), (12, "twice")])
        self.assertEqual(seqs((await store.read_after("b", 0))[1]), [1])

    async def test_retention_by_age(self):
        """
        Pushes as old as C{max_age} are gone, counted in the gap.
        """
        store = await self.store_of(max_age=60.0)
        await store.append(["a"], "r", "old", 0.0)
        await store.append(["a"], "r", "mid", 30.0)
        await store.append(["a"], "r", "new", 59.0)
        self.clock.advance(59.9)
        gap, entries = await store.read_after("a", 0)
        self.assertEqual((gap, seqs(entries)), (None, [1, 2, 3]))
        self.clock.advance(0.1)
        gap, entries = await store.read_after("a", 0)
        self.assertEqual((gap, seqs(entries)), ((1, 1), [2, 3]))
        self.assertEqual(await store.size("a"), 2)
        self.clock.advance(59.0)
        self.assertEqual(await store.read_after("a", 0), ((1, 3), []))
        self.assertEqual(await store.size("a"), 0)
        self.assertEqual(await store.last_seq("a"), 3)

    async def test_seq_continues_across_drops_and_acks(self):
        store = await self.store_of(max_entries=2, max_age=1000.0)
        await self.fill(store, "a", 5)
        await store.ack("a", 5)
        self.assertEqual(await store.size("a"), 0)
        self.assertEqual(seqs(await store.append(["a"], "r", None, 0.0)), [6])
        self.clock.advance(5000)
        self.assertEqual(seqs(await store.append(["a"], "r", None,
                                                 self.clock.seconds())), [7])
        self.assertEqual(await store.size("a"), 1)

    async def test_ack_trims(self):
        store = await self.store_of()
        await self.fill(store, "a", 5)
        await store.ack("a", 3)
        self.assertEqual(await store.size("a"), 2)
        self.assertEqual(await store.read_after("a", 0),
                         (None, [Entry(4, 0.0, "r", 3),
                                 Entry(5, 0.0, "r", 4)]))
        # An older ack changes nothing.
        await store.ack("a", 1)
        self.assertEqual(await store.size("a"), 2)
        self.assertEqual((await store.read_after("a", 0))[0], None)

    async def test_ack_beyond_last_seq(self):
        """
        Acking a seq not yet assigned acks only what exists: later pushes
        are still kept and still delivered.
        """
        store = await self.store_of()
        await self.fill(store, "a", 2)
        await store.ack("a", 10)
        self.assertEqual(await store.size("a"), 0)
        [entry] = await store.append(["a"], "r", "after", 0.0)
        self.assertEqual(entry.seq, 3)
        self.assertEqual(await store.read_after("a", 2),
                         (None, [Entry(3, 0.0, "r", "after")]))
        self.assertEqual(await store.read_after("a", 0),
                         (None, [Entry(3, 0.0, "r", "after")]))

    async def test_ack_is_per_player(self):
        store = await self.store_of()
        await self.fill(store, "a", 3)
        await self.fill(store, "b", 3)
        await store.ack("a", 3)
        self.assertEqual((await store.size("a"), await store.size("b")),
                         (0, 3))

    async def test_no_gap_for_acked(self):
        """
        Acked pushes were received: reading from before the ack reports no
        gap for them.
        """
        store = await self.store_of()
        await self.fill(store, "a", 5)
        await store.ack("a", 3)
        gap, entries = await store.read_after("a", 0)
        self.assertIsNone(gap)
        self.assertEqual(seqs(entries), [4, 5])

    async def test_gap_after_acks_and_count_drop(self):
        store = await self.store_of(max_entries=2)
        await self.fill(store, "a", 3)
        await store.ack("a", 1)
        await self.fill(store, "a", 3)
        # Retained: 5, 6; acked: 1; dropped unacked: 2..4.
        gap, entries = await store.read_after("a", 0)
        self.assertEqual(gap, (2, 4))
        self.assertEqual(seqs(entries), [5, 6])
        self.assertEqual((await store.read_after("a", 3))[0], (4, 4))

    async def test_gap_after_full_drop(self):
        """
        When retention dropped everything, the gap runs to the last seq
        assigned.
        """
        store = await self.store_of(max_age=10.0)
        await self.fill(store, "a", 4, ts=0.0)
        self.clock.advance(100)
        self.assertEqual(await store.read_after("a", 1), ((2, 4), []))
        await store.ack("a", 2)
        self.assertEqual(await store.read_after("a", 0), ((3, 4), []))
        self.assertEqual(await store.read_after("a", 4), (None, []))
        self.assertEqual(await store.read_after("a", 9), (None, []))

    async def test_gap_after_full_drop_by_count_of_acked(self):
        store = await self.store_of(max_entries=3)
        await self.fill(store, "a", 3)
        await store.ack("a", 3)
        self.assertEqual(await store.read_after("a", 0), (None, []))

    async def test_drop(self):
        """
        A dropped mailbox is gone with its numbering: the player's next
        push is seq 1 again. Others are untouched.
        """
        store = await self.store_of()
        await self.fill(store, "a", 2)
        await self.fill(store, "b", 1)
        await store.drop("a")
        self.assertEqual(await store.last_seq("a"), 0)
        self.assertEqual(await store.size("a"), 0)
        self.assertEqual(await store.read_after("a", 0), (None, []))
        self.assertEqual(await store.size("b"), 1)
        self.assertEqual(seqs(await store.append(["a"], "r", 1, 0.0)), [1])

    async def test_results_in_order(self):
        """
        Appends asked for one after the other, without waiting, are
        numbered in that order and their results arrive in that order:
        the gate writes pushes to a session as results arrive.
        """
        store = await self.store_of(max_entries=1000)
        arrived = []
        ds = []
        for i in range(60):
            players = ["a", "b"] if i % 2 else ["b", "a"]
            d = store.append(players, "r", i, 0.0)
            d.addCallback(lambda entries, i=i: arrived.append(
                (i, {e.seq for e in entries})) or entries)
            ds.append(d)
        results = await gatherResults(ds)
        self.assertEqual([i for i, _ in arrived], list(range(60)))
        self.assertEqual([r[0].seq for r in results], list(range(1, 61)))
        self.assertEqual(await store.last_seq("a"), 60)
        self.assertEqual(await store.last_seq("b"), 60)

    async def test_drop_then_append_in_order(self):
        """
        A drop asked for before an append is done before it (a new
        incarnation of the player starts at seq 1, and keeps its push).
        """
        store = await self.store_of()
        await self.fill(store, "a", 3)
        dropped = store.drop("a")
        appended = store.append(["a"], "r", "new", 0.0)
        await dropped
        self.assertEqual(seqs(await appended), [1])
        self.assertEqual(await store.read_after("a", 0),
                         (None, [Entry(1, 0.0, "r", "new")]))
