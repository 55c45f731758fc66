"""
Tests for L{mmogate_plugins.redis}, against the machine's real Redis
(skipped without it, unless C{MMOGATE_REQUIRE_SERVICES=1}): the mailbox
contract and its equivalence with L{gate.mailbox.Mailbox}, the directory
(claims, incarnations, atomic expiry, TTLs), placing pushes across gates,
the bus, and outages played with a proxy the test cuts.

Every test uses key prefixes of its own, deleted afterwards.
"""

import json
import random

from twisted.internet import reactor
from twisted.internet.defer import fail, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from gate.cluster import StoreUnavailable
from gate.envelope import encode
from gate.interfaces import IClusterBus, IMailboxStore, IPlayerDirectory
from gate.mailbox import Entry
from gate.player import Location
from mmogate_plugins.memory import (MemoryClusterBus, MemoryMailboxStore,
                                    MemoryPlayerDirectory)
from gate.session import read_paged
from mmogate_plugins.redis import RedisStore, parse_url
from tests.e2e import TIMEOUT, until, within
from tests.mailbox_contract import MailboxStoreContract
from tests.services import (REDIS_URL, TCPProxy, redis_command, redis_keys,
                            redis_prefix, require_redis)


class Recorder:
    """
    A bus receiver that records what reaches it.
    """

    def __init__(self):
        self.messages = []
        self.resyncs = []

    def received(self, header, payload):
        self.messages.append((header, payload))

    def resync(self, missed):
        self.resyncs.append(missed)


async def start_store(test, prefix, url=REDIS_URL, gate=None, time=None,
                      max_entries=100, max_age=1000.0, timeout=5.0,
                      gate_ttl=10.0, retry_max=0.2):
    """
    A connected L{RedisStore} (listening as C{gate}, if given), stopped by
    C{test}'s cleanups.
    """
    store = RedisStore(reactor, url, prefix, max_entries, max_age, retry_max,
                       timeout, gate_ttl, time=time)
    test.addCleanup(lambda: within(store.stop(gate), TIMEOUT,
                                   "the store to stop"))
    if gate is not None:
        store.receiver = Recorder()
        store.listen(gate, store.receiver)
    else:
        store.start()
    await within(store.when_reachable(), TIMEOUT, "Redis to be reachable")
    return store


def head(data, route="r"):
    """
    A push envelope's head as the gate makes it, stamped now.
    """
    return encode({"t": "push", "route": route, "data": data,
                   "ts": reactor.seconds()})[:-1]


def place(store, gate, player_ids, data, persist=True):
    return store.place(gate, player_ids, head(data), reactor.seconds(),
                       persist)


class RedisCase(TestCase):
    def setUp(self):
        require_redis()
        self.prefix = redis_prefix(self)


class RedisMailboxContractTests(MailboxStoreContract, RedisCase):
    """
    The mailbox contract every store owes the gate, against Redis.
    """

    def setUp(self):
        RedisCase.setUp(self)
        self.clock = Clock()

    async def make_store(self, max_entries, max_age):
        return await start_store(self, redis_prefix(self), time=self.clock,
                                 max_entries=max_entries, max_age=max_age)


class MailboxEquivalenceTests(RedisCase):
    """
    Random sequences of appends, acks, reads and time passing give exactly
    the answers of the in-memory store (L{gate.mailbox.Mailbox}): seqs,
    retained entries, gaps, sizes.
    """

    async def run_sequence(self, rng):
        clock = Clock()
        clock.advance(1000)
        max_entries = rng.randint(1, 6)
        max_age = 10.0
        memory = MemoryMailboxStore(clock, max_entries, max_age)
        redis = await start_store(self, redis_prefix(self), time=clock,
                                  max_entries=max_entries, max_age=max_age)
        players = ["a", "b", "c"]
        for step in range(40):
            op = rng.choice(["append", "append", "append", "ack", "read",
                             "time", "size"])
            player = rng.choice(players)
            last = (await memory.last_seq(player))
            where = f"step {step} ({op} {player})"
            if op == "append":
                who = rng.sample(players, rng.randint(1, 3))
                expected = await memory.append(who, "r", step, clock.seconds())
                got = await redis.append(who, "r", step, clock.seconds())
                self.assertEqual(got, expected, where)
            elif op == "ack":
                seq = rng.randint(0, last + 2)
                await memory.ack(player, seq)
                await redis.ack(player, seq)
            elif op == "read":
                after = rng.randint(0, last + 2)
                self.assertEqual(await redis.read_after(player, after),
                                 await memory.read_after(player, after),
                                 f"{where} after {after}")
            elif op == "size":
                self.assertEqual(await redis.size(player),
                                 await memory.size(player), where)
            else:
                clock.advance(rng.choice([0.5, 2.0, 4.0, 7.0]))
            self.assertEqual(await redis.last_seq(player),
                             await memory.last_seq(player), where)

    async def test_random_sequences(self):
        for seed in range(12):
            await self.run_sequence(random.Random(seed))


class DirectoryContract:
    """
    What every L{IPlayerDirectory} owes the gate; mixed into a test case
    that defines C{make_directory()}.
    """

    async def test_interface(self):
        self.assertTrue(verifyObject(IPlayerDirectory,
                                     await self.make_directory()))

    async def test_claim_makes_and_keeps_the_incarnation(self):
        directory = await self.make_directory()
        claim = await directory.claim("a", "g", "s1", 1.0)
        self.assertIsNone(claim.previous)
        self.assertTrue(claim.epoch)
        self.assertEqual(await directory.lookup("a"),
                         Location("a", "g", "s1", 1.0, claim.epoch))
        again = await directory.claim("a", "h", "s2", 2.0)
        self.assertEqual(again.epoch, claim.epoch)
        self.assertEqual(again.previous,
                         Location("a", "g", "s1", 1.0, claim.epoch))

    async def test_claim_of_offline_player(self):
        directory = await self.make_directory()
        await directory.claim("a", "g", "s1", 1.0)
        self.assertTrue(await directory.release("a", "g", "s1", 2.0))
        self.assertIsNone((await directory.claim("a", "g", "s2", 3.0)).previous)

    async def test_resume_claim(self):
        """
        A claim naming an incarnation never creates a player and is refused
        for another incarnation.
        """
        directory = await self.make_directory()
        self.assertIsNone(await directory.claim("a", "g", "s1", 1.0, "e0"))
        self.assertIsNone(await directory.lookup("a"))
        epoch = (await directory.claim("a", "g", "s1", 1.0)).epoch
        self.assertIsNone(await directory.claim("a", "g", "s2", 2.0, "e0"))
        self.assertEqual((await directory.lookup("a")).session_id, "s1")
        self.assertEqual((await directory.claim("a", "g", "s2", 2.0,
                                                epoch)).epoch, epoch)

    async def test_release_only_own_session(self):
        directory = await self.make_directory()
        epoch = (await directory.claim("a", "g", "s1", 1.0)).epoch
        self.assertFalse(await directory.release("a", "g", "s0", 2.0))
        self.assertFalse(await directory.release("a", "h", "s1", 2.0))
        self.assertFalse(await directory.release("b", "g", "s1", 2.0))
        self.assertTrue(await directory.release("a", "g", "s1", 2.0))
        self.assertEqual(await directory.lookup("a"),
                         Location("a", "g", None, 2.0, epoch))

    async def test_expire_only_if_offline_here(self):
        directory = await self.make_directory()
        epoch = (await directory.claim("a", "g", "s1", 1.0)).epoch
        self.assertFalse(await directory.expire("a", "g", epoch))
        await directory.release("a", "g", "s1", 2.0)
        self.assertFalse(await directory.expire("a", "h", epoch))
        self.assertFalse(await directory.expire("a", "g", "other"))
        self.assertTrue(await directory.expire("a", "g", epoch))
        self.assertIsNone(await directory.lookup("a"))
        self.assertFalse(await directory.expire("a", "g", epoch))
        # A new incarnation after expiry.
        self.assertNotEqual((await directory.claim("a", "g", "s3", 3.0)).epoch,
                            epoch)

    async def test_forget(self):
        directory = await self.make_directory()
        await directory.claim("a", "g", "s1", 1.0)
        await directory.forget("a")
        self.assertIsNone(await directory.lookup("a"))
        await directory.forget("never")


class MemoryDirectoryContractTests(DirectoryContract, TestCase):
    async def make_directory(self):
        return MemoryPlayerDirectory()


class RedisDirectoryContractTests(DirectoryContract, RedisCase):
    async def make_directory(self):
        return await start_store(self, self.prefix)


class RedisDirectoryTests(RedisCase):
    async def test_interfaces(self):
        store = await start_store(self, self.prefix)
        for interface in (IPlayerDirectory, IMailboxStore, IClusterBus):
            self.assertTrue(verifyObject(interface, store))
        self.assertTrue(verifyObject(IClusterBus, MemoryClusterBus()))

    async def test_new_incarnation_starts_a_new_mailbox(self):
        """
        A player created again after expiry numbers from 1, whatever its
        earlier incarnation left.
        """
        store = await start_store(self, self.prefix)
        epoch = (await store.claim("a", "g", "s1", 1.0)).epoch
        await place(store, "g", ["a"], 1, True)
        await place(store, "g", ["a"], 2, True)
        await store.release("a", "g", "s1", 2.0)
        self.assertTrue(await store.expire("a", "g", epoch))
        self.assertEqual(await redis_keys(self.prefix), [])
        await store.claim("a", "g", "s2", 3.0)
        self.assertEqual(await store.last_seq("a"), 0)
        self.assertEqual(await place(store, "g", ["a"], 3, True),
                         [("offline", 1)])

    async def test_claim_answers_seq_at_claim(self):
        store = await start_store(self, self.prefix)
        await store.claim("a", "g", "s1", 1.0)
        for i in range(3):
            await place(store, "g", ["a"], i, True)
        self.assertEqual((await store.claim("a", "g", "s2", 2.0)).last_seq, 3)

    async def test_ttls(self):
        """
        Entries and mailboxes expire together, past the idle timeout, if no
        gate refreshes or expires them.
        """
        store = await start_store(self, self.prefix, max_age=100.0)
        self.assertEqual(store.key_ttl_ms, 150000)
        await store.claim("a", "g", "s1", 1.0)
        await place(store, "g", ["a"], 1, True)
        for key in (b"p:a", b"m:a"):
            ttl = await redis_command("PTTL", self.prefix.encode() + key)
            self.assertTrue(140000 < ttl <= 150000, (key, ttl))

    async def test_drop_spares_a_live_player(self):
        store = await start_store(self, self.prefix)
        await store.claim("a", "g", "s1", 1.0)
        await place(store, "g", ["a"], 1, True)
        await store.drop("a")
        self.assertEqual(await store.size("a"), 1)

    async def test_odd_player_ids(self):
        store = await start_store(self, self.prefix)
        for player_id in ("\ud800x", "é\n\"\\/", "1234", " "):
            claim = await store.claim(player_id, "g", "s", 1.0)
            self.assertEqual((await store.lookup(player_id)).epoch,
                             claim.epoch)
            [(outcome, seq)] = await place(store, "g", [player_id], 1)
            self.assertEqual((outcome, seq), ("offline", 1))
            gap, entries = await store.read_after(player_id, 0)
            self.assertEqual([e.seq for e in entries], [1])

    async def test_racing_claims_form_one_chain(self):
        """
        Claims of one player from two gates at once are serialised: each
        claim names the one before it as previous, so exactly one session
        is left as the player's and every other one is replaced by exactly
        one later claim.
        """
        a = await start_store(self, self.prefix)
        b = await start_store(self, self.prefix)
        claims = [(store, gate, f"s{i}")
                  for i in range(40)
                  for store, gate in ((a, "A"), (b, "B"))]
        results = await gatherResults([
            store.claim("p", gate, session, 1.0)
            for store, gate, session in claims])
        previous = [r.previous for r in results]
        self.assertEqual(sum(p is None for p in previous), 1)
        named = [(p.gate_id, p.session_id) for p in previous if p is not None]
        self.assertEqual(len(set(named)), len(named))
        everyone = {(gate, session) for _, gate, session in claims}
        [last] = everyone - set(named)
        location = await a.lookup("p")
        self.assertEqual((location.gate_id, location.session_id), last)
        self.assertEqual(len({r.epoch for r in results}), 1)

    async def test_claims_are_numbered(self):
        """
        Each claim answers its number and the number of the claim that
        made the session it replaces: a kick names it, so that a later
        claim of the same session is not taken for the one replaced.
        """
        store = await start_store(self, self.prefix)
        first = await store.claim("p", "A", "s", 1.0)
        self.assertEqual((first.number, first.previous), (1, None))
        second = await store.claim("p", "B", "t", 2.0)
        self.assertEqual((second.number, second.previous.session_id,
                          second.previous_number), (2, "s", 1))
        third = await store.claim("p", "A", "s", 3.0)
        self.assertEqual((third.number, third.previous.session_id,
                          third.previous_number), (3, "t", 2))
        await store.release("p", "A", "s", 4.0)
        fourth = await store.claim("p", "A", "s2", 5.0)
        self.assertEqual((fourth.number, fourth.previous), (4, None))

    def test_parse_url(self):
        self.assertEqual(parse_url("redis://:pw@h:7000/3")["password"], "pw")
        self.assertEqual(parse_url("redis://h:7000/3")["db"], 3)
        self.assertEqual(parse_url("rediss://u:p@h")["username"], "u")
        self.assertEqual(parse_url("unix:///tmp/r.sock?db=2")["path"],
                         "/tmp/r.sock")


class PlaceTests(RedisCase):
    """
    A push numbered, stored and handed to the players' gates in one step.
    """

    async def gates(self, gate_ttl=10.0):
        a = await start_store(self, self.prefix, gate="A", gate_ttl=gate_ttl)
        b = await start_store(self, self.prefix, gate="B", gate_ttl=gate_ttl)
        await a.heartbeat("A", 1)
        await b.heartbeat("B", 1)
        return a, b

    async def test_outcomes(self):
        a, b = await self.gates()
        await a.claim("on-a", "A", "sa", 1.0)
        await b.claim("on-b", "B", "sb", 1.0)
        await b.claim("off", "B", "so", 1.0)
        await b.release("off", "B", "so", 2.0)
        result = await place(b, "B", ["on-a", "on-b", "ghost", "off"], {"x": 1}, True)
        self.assertEqual(result, [("delivered", 1), ("delivered", 1),
                                  ("unknown", 0), ("offline", 1)])
        transient = await place(a, "A", ["on-a", "off", "ghost"], 2, False)
        self.assertEqual(transient, [("delivered", 0), ("offline", 0),
                                     ("unknown", 0)])
        self.assertEqual(await a.size("off"), 1)
        await until(lambda: len(a.receiver.messages) == 2
                    and len(b.receiver.messages) == 1, "the pushes")
        self.assertEqual(
            [(h, json.loads(p + b"}")["data"]) for h, p in a.receiver.messages],
            [({"op": "push", "to": [["on-a", "sa", 1]]}, {"x": 1}),
             ({"op": "push", "to": [["on-a", "sa", 0]]}, 2)])
        self.assertEqual(
            [(h, json.loads(p + b"}")["data"]) for h, p in b.receiver.messages],
            [({"op": "push", "to": [["on-b", "sb", 1]]}, {"x": 1})])

    async def test_seq_continuous_across_gates(self):
        """
        Pushes placed from two gates at once get one run of seqs, and reach
        the player's gate in that order.
        """
        a, b = await self.gates()
        await a.claim("p", "A", "s", 1.0)
        placed = await gatherResults([
            place(store, gate, ["p"], i, True)
            for i in range(50) for store, gate in ((a, "A"), (b, "B"))])
        self.assertEqual(sorted(seq for [(_, seq)] in placed),
                         list(range(1, 101)))
        await until(lambda: len(a.receiver.messages) == 100, "the pushes")
        self.assertEqual([h["to"][0][2] for h, _ in a.receiver.messages],
                         list(range(1, 101)))
        gap, entries = await b.read_after("p", 0)
        self.assertEqual([e.seq for e in entries], list(range(1, 101)))

    async def test_many_players_in_chunks(self):
        a, _ = await self.gates()
        players = [f"p{i}" for i in range(2300)]
        await gatherResults([a.claim(p, "A", "s" + p, 1.0) for p in players])
        result = await place(a, "A", players + ["ghost"], 1, True)
        self.assertEqual(result, [("delivered", 1)] * 2300 + [("unknown", 0)])
        await until(lambda: len(a.receiver.messages) == 3, "three messages")
        self.assertEqual(sum(len(h["to"]) for h, _ in a.receiver.messages),
                         2300)

    async def test_dead_gate_is_not_delivered(self):
        """
        A player online on a gate without a heartbeat, or one that does not
        listen, gets its push stored, not delivered.
        """
        a, b = await self.gates(gate_ttl=0.3)
        await a.claim("p", "A", "s", 1.0)
        await until(lambda: redis_command(
            "EXISTS", self.prefix + "g:A").addCallback(lambda n: n == 0),
            "A's heartbeat to lapse")
        self.assertEqual(await place(b, "B", ["p"], 1, True),
                         [("offline", 1)])
        # Alive, but not listening (its subscriber is gone).
        await a.heartbeat("A", 1)
        await a._sub.stop()
        await until(lambda: redis_command(
            "PUBSUB", "NUMSUB", self.prefix + "c:A").addCallback(
                lambda reply: reply[1] == 0), "Redis to drop A's subscriber")
        self.assertEqual(await place(b, "B", ["p"], 2, True),
                         [("offline", 2)])


class BusTests(RedisCase):
    async def test_send_to_player_and_gate(self):
        a = await start_store(self, self.prefix, gate="A")
        b = await start_store(self, self.prefix, gate="B")
        await a.heartbeat("A", 1)
        await a.claim("p", "A", "s", 1.0)
        self.assertTrue(await b.send_to_player("p", "kick", b'{"x":1}'))
        self.assertFalse(await b.send_to_player("ghost", "kick", b"{}"))
        self.assertTrue(await b.send_to_gate("A", {"op": "o"}, b"pay"))
        self.assertFalse(await b.send_to_gate("Z", {"op": "o"}, b"pay"))
        await a.release("p", "A", "s", 2.0)
        self.assertFalse(await b.send_to_player("p", "kick", b"{}"))
        await until(lambda: len(a.receiver.messages) == 2, "the messages")
        self.assertEqual(a.receiver.messages,
                         [({"op": "kick", "p": "p", "s": "s"}, b'{"x":1}'),
                          ({"op": "o"}, b"pay")])

    async def test_broadcast_and_heartbeats(self):
        a = await start_store(self, self.prefix, gate="A")
        b = await start_store(self, self.prefix, gate="B")
        c = await start_store(self, self.prefix, gate="C", gate_ttl=0.2)
        await a.heartbeat("A", 3)
        await b.heartbeat("B", 5)
        await c.heartbeat("C", 7)
        await until(lambda: redis_command(
            "EXISTS", self.prefix + "g:C").addCallback(lambda n: n == 0),
            "C's heartbeat to lapse")
        self.assertEqual(await a.broadcast("A", b"{}"), {"B": 5})
        members = sorted(await redis_command("SMEMBERS", self.prefix + "gates"))
        self.assertEqual(members, [b"A", b"B"])
        await until(lambda: len(b.receiver.messages) == 1, "the broadcast")
        self.assertEqual(b.receiver.messages[0],
                         ({"op": "broadcast", "from": "A"}, b"{}"))
        await within(b.stop("B"), TIMEOUT, "B to leave")
        self.assertEqual(await a.broadcast("A", b"{}"), {})

    async def test_info_and_refresh(self):
        a = await start_store(self, self.prefix, gate="A")
        await a.heartbeat("A", 1)
        self.assertIsNone(await a.info("ghost"))
        epoch = (await a.claim("p", "A", "s", 1.0)).epoch
        await place(a, "A", ["p"], 1, True)
        location, last_seq, size, alive = await a.info("p")
        self.assertEqual((location.session_id, last_seq, size, alive),
                         ("s", 1, 1, True))
        statuses = await a.refresh("A", [("p", "s", epoch, 0),
                                         ("p", "other", epoch, 0),
                                         ("gone", "", "e", 0),
                                         ("back", "s2", "e2", 7)])
        self.assertEqual(statuses, ["ok", "elsewhere", "missing",
                                    "recreated"])
        back = await a.lookup("back")
        self.assertEqual((back.session_id, back.epoch), ("s2", "e2"))
        self.assertEqual(await a.last_seq("back"), 7)
        self.assertEqual(await place(a, "A", ["back"], 1, True),
                         [("delivered", 8)])


class FakeDurable:
    """
    Stands in for the PostgreSQL copy (L{mmogate_plugins.postgres.
    PostgresMailboxStore}): snapshots from C{copies}, writes recorded.
    """

    reachable = True
    problem = None

    def __init__(self, copies=None):
        self.copies = dict(copies or {})
        self.written = []
        self.acks = []
        self.dropped = []
        self.asked = []

    def snapshot(self, player_ids):
        self.asked.append(list(player_ids))
        return succeed({p: self.copies[p] for p in player_ids
                        if p in self.copies})

    def store_numbered(self, entries, ts, route, data):
        self.written.append((entries, route, data))
        return succeed(None)

    def mirror_ack(self, player_id, seq, epoch):
        self.acks.append((player_id, seq, epoch))

    def drop(self, player_id):
        self.dropped.append(player_id)
        return succeed(None)


def copy(epoch, last_seq, acked, seqs):
    return (epoch, last_seq, acked,
            [Entry(seq, 1.0 * seq, "r", {"n": seq}) for seq in seqs])


class DurableCopyTests(RedisCase):
    """
    With a durable copy (C{store.postgres_dsn}): pushes written through,
    acks and drops mirrored, and players Redis lost put back from it by a
    claim, a push or a refresh.
    """

    async def store(self, copies=None):
        store = await start_store(self, self.prefix, gate="A",
                                  time=Clock())
        await store.heartbeat("A", 1)
        store.durable = FakeDurable(copies)
        return store

    async def test_claim_seeds_from_copy(self):
        store = await self.store({"alice": copy("E1", 5, 2, [3, 4, 5])})
        claim = await store.claim("alice", "A", "s1", 1.0)
        self.assertEqual((claim.epoch, claim.last_seq), ("E1", 5))
        self.assertEqual(await store.read_after("alice", 0),
                         (None, [Entry(seq, 1.0 * seq, "r", {"n": seq})
                                 for seq in (3, 4, 5)]))
        self.assertEqual(await store.last_seq("alice"), 5)
        # Known to Redis now: the copy is not asked again.
        await store.claim("alice", "A", "s2", 2.0)
        self.assertEqual(store.durable.asked, [["alice"]])
        # Without a copy a login starts anew; a resume is refused.
        fresh = await store.claim("bob", "A", "s3", 1.0)
        self.assertEqual(fresh.last_seq, 0)
        self.assertNotEqual(fresh.epoch, "E1")
        self.assertIsNone(await store.claim("carol", "A", "s4", 1.0, "E9"))
        self.assertIsNone(await store.lookup("carol"))

    async def test_resume_seeds_same_incarnation_only(self):
        store = await self.store({"alice": copy("E1", 2, 0, [1, 2])})
        self.assertIsNone(await store.claim("alice", "A", "s1", 1.0, "E0"))
        self.assertIsNone(await store.lookup("alice"))
        claim = await store.claim("alice", "A", "s1", 1.0, "E1")
        self.assertEqual((claim.epoch, claim.last_seq), ("E1", 2))

    async def test_place_writes_through(self):
        store = await self.store({"erin": copy("E5", 3, 1, [2, 3])})
        epoch = (await store.claim("alice", "A", "s1", 1.0)).epoch
        result = await place(store, "A", ["alice", "erin", "ghost"], {"x": 1})
        self.assertEqual(result, [("delivered", 1), ("offline", 4),
                                  ("unknown", 0)])
        self.assertEqual(store.durable.written, [
            ([("alice", 1, epoch), ("erin", 4, "E5")], "r", {"x": 1})])
        # erin was put back without a gate, with her copy.
        erin = await store.lookup("erin")
        self.assertEqual((erin.gate_id, erin.session_id, erin.epoch),
                         ("", None, "E5"))
        self.assertEqual([e.seq for e in
                          (await store.read_after("erin", 0))[1]], [2, 3, 4])
        # A transient push counts a player known only to the copy offline.
        store.durable.copies["frank"] = copy("E6", 1, 0, [1])
        self.assertEqual(await place(store, "A", ["frank"], 2, False),
                         [("offline", 0)])
        self.assertIsNone(await store.lookup("frank"))

    async def test_failed_write_through(self):
        """
        A push Redis took whose durable write fails fails (the push API
        answers 503) though it was placed: at least once. Known to be
        away, the copy refuses a push before Redis takes it.
        """
        store = await self.store()
        await store.claim("alice", "A", "s1", 1.0)
        store.durable.store_numbered = lambda *a: fail(RuntimeError("down"))
        failure = await within(place(store, "A", ["alice"], 1).addErrback(
            lambda f: f.value), TIMEOUT, "a push")
        self.assertIsInstance(failure, RuntimeError)
        self.assertEqual(await store.last_seq("alice"), 1)
        store.durable.reachable = False
        store.durable.problem = "gone"
        failure = await within(place(store, "A", ["alice"], 2).addErrback(
            lambda f: f.value), TIMEOUT, "a push")
        self.assertIn("PostgreSQL unavailable: gone", str(failure))
        self.assertEqual(await store.last_seq("alice"), 1)
        # Transient pushes need no copy.
        self.assertEqual(await place(store, "A", ["alice"], 3, False),
                         [("delivered", 0)])

    async def test_acks_and_drops_mirrored(self):
        store = await self.store()
        epoch = (await store.claim("alice", "A", "s1", 1.0)).epoch
        await place(store, "A", ["alice"], 1)
        await place(store, "A", ["alice"], 2)
        await store.ack("alice", 9)
        await store.ack("ghost", 3)
        self.assertEqual(store.durable.acks, [("alice", 2, epoch)])
        await store.release("alice", "A", "s1", 2.0)
        self.assertTrue(await store.expire("alice", "A", epoch))
        await store.drop("alice")
        self.assertEqual(store.durable.dropped, ["alice"])

    async def test_refresh_restores(self):
        store = await self.store({"on": copy("E1", 6, 4, [5, 6]),
                                  "off": copy("E2", 3, 0, [1, 2, 3]),
                                  "stale": copy("E0", 3, 0, [])})
        statuses = await store.refresh("A", [("on", "s1", "E1", 4),
                                             ("off", "", "E2", 0),
                                             ("gone", "", "E3", 0),
                                             ("stale", "", "E9", 0),
                                             ("new", "s2", "E4", 7)])
        self.assertEqual(statuses, ["recreated", "restored", "missing",
                                    "missing", "recreated"])
        self.assertEqual(await store.last_seq("on"), 6)
        self.assertEqual([e.seq for e in
                          (await store.read_after("on", 0))[1]], [5, 6])
        off = await store.lookup("off")
        self.assertEqual((off.gate_id, off.session_id, off.epoch),
                         ("A", None, "E2"))
        self.assertEqual(await store.last_seq("new"), 7)
        # An entry a push put back without a gate is taken over by the
        # gate of the player's session.
        store.durable.copies["p"] = copy("E7", 1, 0, [1])
        await place(store, "A", ["p"], 1)
        self.assertEqual(await store.refresh("A", [("p", "s3", "E7", 1)]),
                         ["adopted"])
        self.assertEqual((await store.lookup("p"))[1:3], ("A", "s3"))
        self.assertEqual(await store.refresh("A", [("p", "s3", "E7", 1)]),
                         ["ok"])
        # Also when the push put it back between the refresh's look and
        # its restore.
        store.durable.copies["q"] = copy("E8", 1, 0, [1])
        await place(store, "A", ["q"], 1)
        statuses = ["absent", "absent"]
        await store._restore_absent(statuses, store.durable, "A",
                                    [("q", "s4", "E8", 0),
                                     ("off", "", "E2", 0)], 1.0)
        self.assertEqual(statuses, ["adopted", "ok"])
        self.assertEqual((await store.lookup("q"))[1:3], ("A", "s4"))


class BanTests(RedisCase):
    """
    Bans recorded in Redis, checked by every claim.
    """

    async def test_banned_and_revoked(self):
        store = await start_store(self, self.prefix)
        epoch = (await store.claim("alice", "A", "s1", 100.0)).epoch
        await store.ban("alice", 160.0, 100.0, 86400.0)
        for args in ((), (epoch, 99.0), (epoch, 101.0)):
            failure = await within(
                store.claim("alice", "B", "s2", 120.0, *args).addErrback(
                    lambda f: f.value), TIMEOUT, "a claim")
            self.assertEqual(failure.code, "auth_failed")
            self.assertIn("banned", failure.msg)
        # After the ban: tokens issued up to it stay revoked.
        self.assertEqual((await store.claim("alice", "B", "s2", 160.0)).epoch,
                         epoch)
        for issued in (100.0, 50.0, None):
            failure = await within(
                store.claim("alice", "B", "s3", 161.0, epoch,
                            issued).addErrback(lambda f: f.value), TIMEOUT,
                "a claim")
            self.assertEqual(failure.code, "resume_rejected")
        claim = await store.claim("alice", "B", "s3", 161.0, epoch, 100.001)
        self.assertEqual(claim.previous.session_id, "s2")
        self.assertEqual((await store.lookup("alice")).session_id, "s3")

    async def test_ban_revokes_up_to_the_last_claim(self):
        """
        A token is issued as of its claim; a ban Redis records after that
        claim revokes it even when the ban was sent (stamped) before it:
        the revocation reaches the player's last claim.
        """
        store = await start_store(self, self.prefix)
        epoch = (await store.claim("alice", "A", "s1", 100.0)).epoch
        await store.ban("alice", 100.5, 99.0, 86400.0)
        self.assertEqual(await redis_command(
            "HGET", self.prefix + "b:alice", "r"), b"100.0")
        failure = await within(
            store.claim("alice", "B", "s2", 101.0, epoch, 100.0).addErrback(
                lambda f: f.value), TIMEOUT, "a claim")
        self.assertEqual(failure.code, "resume_rejected")

    async def test_ban_record(self):
        store = await start_store(self, self.prefix)
        await store.ban("alice", 1100.0, 1000.0, 10.0)
        key = self.prefix + "b:alice"
        self.assertEqual(await redis_command("HMGET", key, "u", "r"),
                         [b"1100.0", b"1000.0"])
        ttl = int(await redis_command("PTTL", key))
        self.assertTrue(99000 < ttl <= 100000, ttl)
        # A later, shorter ban replaces the end, never the revocation or
        # the key's lifetime; a revocation moves only forward.
        await store.ban("alice", 1000.0, 1050.0, 10.0)
        self.assertEqual(await redis_command("HMGET", key, "u", "r"),
                         [b"1000.0", b"1050.0"])
        self.assertGreater(int(await redis_command("PTTL", key)), 90000)
        await store.ban("alice", 1000.0, 900.0, 10.0)
        self.assertEqual(await redis_command("HMGET", key, "r"), [b"1050.0"])


class PageTests(RedisCase):
    async def test_read_after_pages(self):
        """
        A long mailbox is read a page at a time (C{read_paged}): each
        read holds at most C{page_size} entries, and the pages together
        are the whole mailbox, with the gap (if any) on the first.
        """
        store = await start_store(self, self.prefix, max_entries=450)
        self.assertEqual(store.page_size, 200)
        await store.claim("a", "g", "s", 1.0)
        for i in range(460):
            await place(store, "g", ["a"], i)
        gap, entries = await store.read_after("a", 0, 200)
        self.assertEqual((gap, [e.seq for e in entries]),
                         ((1, 10), list(range(11, 211))))
        read = []
        gap, entries, more = await read_paged(store, "a", 0)
        self.assertEqual(gap, (1, 10))
        while True:
            read.append(len(entries))
            if more is None:
                break
            last = entries[-1].seq
            gap, entries, more = await more(last)
            self.assertIsNone(gap)
        self.assertEqual(read, [200, 200, 50])


class RestartTests(RedisCase):
    """
    A gate that restarts under the same C{gate.id}: the sessions its
    earlier process claimed are gone, whatever the new heartbeat says, and
    the new process takes their players over.
    """

    async def test_sessions_of_an_earlier_process(self):
        old = await start_store(self, self.prefix, gate="A")
        await old.heartbeat("A", 1)
        epoch = (await old.claim("bob", "A", "s1", 1.0)).epoch
        await old.claim("carol", "A", "s2", 1.0)
        await old.release("carol", "A", "s2", 2.0)
        await old.claim("dave", "A", "s3", 1.0)
        await old.claim("dave", "B", "s4", 1.5)
        self.assertEqual(await place(old, "A", ["bob"], 1),
                         [("delivered", 1)])
        # A new process of gate A (the old one died without a word).
        new = await start_store(self, self.prefix, gate="A")
        self.assertFalse(await new.heartbeat("A", 0))
        self.assertEqual(await place(new, "A", ["bob"], 2), [("offline", 2)])
        self.assertFalse(await new.send_to_player("bob", "kick", b"{}"))
        location, _, _, alive = await new.info("bob")
        self.assertEqual((location.session_id, alive), ("s1", False))
        # It takes over what the old one left: bob (online then) and carol
        # (offline there); dave lives on gate B.
        adopted = sorted(await new.adopt("A", 10.0))
        self.assertEqual(adopted, [("bob", epoch, 10.0, "s1"),
                                   ("carol", adopted[1][1], 2.0, None)])
        self.assertEqual((await new.lookup("bob")).session_id, None)
        self.assertEqual(await new.adopt("A", 11.0), [])
        self.assertEqual(sorted(await redis_command(
            "SMEMBERS", self.prefix + "s:A")), [b"bob", b"carol"])
        self.assertTrue(await new.expire("bob", "A", epoch))
        self.assertEqual(await redis_command(
            "SMEMBERS", self.prefix + "s:A"), [b"carol"])
        # The old process leaving does not take the new one's heartbeat.
        await within(old.stop("A"), TIMEOUT, "the old process to stop")
        self.assertTrue(await new.heartbeat("A", 0))


class OutageTests(RedisCase):
    """
    Redis going away and coming back, played with a proxy the test cuts.
    """

    async def test_cut_and_restore(self):
        proxy = await TCPProxy().start(self)
        store = await start_store(self, self.prefix, url=proxy.url, gate="A")
        self.assertEqual(store.receiver.resyncs, [False])
        await store.claim("p", "A", "s", 1.0)
        proxy.cut()
        await until(lambda: not store.reachable, "the store to notice")
        failure = await self.assertFailure(store.claim("q", "A", "s", 1.0),
                                           StoreUnavailable)
        self.assertEqual(str(failure), "the shared player store is "
                         "unreachable; try again shortly")
        await self.assertFailure(place(store, "A", ["p"], 1, True),
                                 StoreUnavailable)
        proxy.restore()
        await within(store.when_reachable(), TIMEOUT, "the store to be back")
        # The subscription was lost too: messages may have been missed.
        self.assertEqual(store.receiver.resyncs, [False, True])
        self.assertEqual((await store.lookup("p")).session_id, "s")

    async def test_stalled_redis_times_out(self):
        proxy = await TCPProxy().start(self)
        store = await start_store(self, self.prefix, url=proxy.url,
                                  timeout=0.3)
        proxy.stall()
        started = reactor.seconds()
        await self.assertFailure(store.lookup("p"), StoreUnavailable)
        self.assertLess(reactor.seconds() - started, 2.0)
        await until(lambda: not store.reachable, "the store to notice")
        proxy.restore()
        await within(store.when_reachable(), TIMEOUT, "the store to be back")
        self.assertIsNone(await store.lookup("p"))

    async def test_unreachable_at_start(self):
        proxy = await TCPProxy().start(self)
        proxy.cut()
        store = RedisStore(reactor, proxy.url, self.prefix, 10, 100.0, 0.1,
                           1.0, 10.0)
        self.addCleanup(lambda: within(store.stop(), TIMEOUT, "stop"))
        store.start()
        await self.assertFailure(store.lookup("p"), StoreUnavailable)
        proxy.restore()
        await within(store.when_reachable(), TIMEOUT, "the store")
        self.assertIsNone(await store.lookup("p"))
