"""
Tests for L{gate.bans} and the kick that revokes: a banned player's login,
auth and resume answer C{auth_failed}, and resume tokens issued before a
ban are refused for good; on a L{Clock}.
"""

import jwt
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gate import errors
from gate.bans import Bans

from tests.fakes import AUTH_SECRET, Stack

DAY = 86400.0


class BansTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.bans = Bans(self.clock, token_ttl=DAY)

    def test_not_banned(self):
        self.assertFalse(self.bans.banned("alice"))
        self.assertIsNone(self.bans.revoked_before("alice"))

    def test_ban_lasts_until(self):
        self.bans.ban("alice", 1060)
        self.assertTrue(self.bans.banned("alice"))
        self.assertFalse(self.bans.banned("bob"))
        self.clock.advance(59.9)
        self.assertTrue(self.bans.banned("alice"))
        self.clock.advance(0.1)
        self.assertFalse(self.bans.banned("alice"))

    def test_revocation_outlives_ban(self):
        """
        Tokens issued before the ban stay revoked after it, as long as they
        could be valid.
        """
        self.bans.ban("alice", 1060)
        self.clock.advance(3600)
        self.assertFalse(self.bans.banned("alice"))
        self.assertEqual(self.bans.revoked_before("alice"), 1000)
        self.clock.advance(DAY - 3600)
        self.assertIsNone(self.bans.revoked_before("alice"))

    def test_zero_revokes_only(self):
        self.bans.ban("alice", 1000)
        self.assertFalse(self.bans.banned("alice"))
        self.assertEqual(self.bans.revoked_before("alice"), 1000)

    def test_later_ban_replaces_end(self):
        """
        An operator may shorten or lift a ban; revocation only moves on.
        """
        self.bans.ban("alice", 1000 + DAY * 30)
        self.clock.advance(10)
        self.bans.ban("alice", 1010)
        self.assertFalse(self.bans.banned("alice"))
        self.assertEqual(self.bans.revoked_before("alice"), 1010)
        self.bans.ban("alice", 2000)
        self.assertTrue(self.bans.banned("alice"))

    def test_long_ban_kept_past_token_ttl(self):
        self.bans.ban("alice", 1000 + 3 * DAY)
        self.clock.advance(2 * DAY)
        self.bans.ban("bob", self.clock.seconds())
        self.assertTrue(self.bans.banned("alice"))
        self.assertEqual(len(self.bans), 2)

    def test_expired_pruned_on_insert(self):
        for i in range(100):
            self.bans.ban(f"p{i}", 1010)
        self.assertEqual(len(self.bans), 100)
        self.clock.advance(DAY)
        self.bans.ban("new", 0)
        self.assertEqual(len(self.bans), 1)
        self.assertEqual(len(self.bans._expiry), 1)

    def test_reban_keeps_entry_until_its_latest_time(self):
        self.bans.ban("alice", 1000)
        self.clock.advance(DAY / 2)
        self.bans.ban("alice", self.clock.seconds())
        self.clock.advance(DAY / 2)
        self.bans.ban("bob", 0)
        # The first ban's time has passed; the second one's revocation
        # still holds.
        self.assertEqual(self.bans.revoked_before("alice"), 1000 + DAY / 2)


def auth_token(sub, exp=10 ** 10):
    return jwt.encode({"sub": sub, "exp": exp}, AUTH_SECRET, algorithm="HS256")


class KickWithBanTests(SynchronousTestCase):
    """
    C{PlayerManager.kick} with C{ban_seconds}, as C{POST /v1/kick} calls
    it, seen by the player's sessions.
    """

    def setUp(self):
        self.stack = Stack()
        self.stack.clock.advance(100)

    def answer(self, connection):
        return connection.messages[-1]

    def resume(self, token, player="alice"):
        session, connection = self.stack.connect()
        self.stack.send(session, t="resume", id=7, player_id=player,
                        resume_token=token, last_seq=0)
        return session, connection

    def test_kick_with_ban(self):
        session, connection, resp = self.stack.login("alice")
        self.stack.clock.advance(1)
        self.assertTrue(self.stack.players.kick("alice", "admin", "cheating",
                                                ban_seconds=60))
        self.assertEqual(connection.messages[-1],
                         {"t": "kick", "reason": "admin", "msg": "cheating"})
        # Login: the backend names the player, then the gate refuses.
        other, c2 = self.stack.connect()
        self.stack.send(other, t="login", id=1, data={"name": "alice"})
        self.assertEqual(len(self.stack.backend.logins), 2)
        self.assertEqual((self.answer(c2)["id"], self.answer(c2)["code"]),
                         (1, errors.AUTH_FAILED))
        self.stack.send(other, t="auth", id=2, token=auth_token("alice"))
        self.assertEqual(self.answer(c2)["code"], errors.AUTH_FAILED)
        _, c3 = self.resume(resp["resume_token"])
        self.assertEqual(self.answer(c3)["code"], errors.AUTH_FAILED)
        self.assertIn("banned", self.answer(c3)["msg"])
        self.assertIsNone(other.player)
        self.assertFalse(c2.closed)
        # Others are not affected.
        self.stack.send(other, t="login", id=3, data={"name": "bob"})
        self.assertEqual(self.answer(c2)["t"], "resp")

    def test_tokens_revoked_after_ban(self):
        session, connection, resp = self.stack.login("alice")
        self.stack.clock.advance(1)
        self.stack.players.kick("alice", "admin", "x", ban_seconds=60)
        self.stack.clock.advance(60)
        _, c1 = self.resume(resp["resume_token"])
        self.assertEqual(self.answer(c1)["code"], errors.RESUME_REJECTED)
        self.assertIn("revoked", self.answer(c1)["msg"])
        # After the ban a new login works, and its token resumes.
        session, connection, resp = self.stack.login("alice")
        self.stack.clock.advance(1)
        session.lost()
        _, c2 = self.resume(resp["resume_token"])
        self.assertEqual(self.answer(c2)["t"], "resp")

    def test_token_issued_same_instant_revoked(self):
        session, connection, resp = self.stack.login("alice")
        self.stack.players.kick("alice", "admin", "x", ban_seconds=0)
        _, c1 = self.resume(resp["resume_token"])
        self.assertEqual(self.answer(c1)["code"], errors.RESUME_REJECTED)

    def test_zero_revokes_without_ban(self):
        session, connection, resp = self.stack.login("alice")
        self.stack.clock.advance(1)
        self.stack.players.kick("alice", "admin", "x", ban_seconds=0)
        _, c1 = self.resume(resp["resume_token"])
        self.assertEqual(self.answer(c1)["code"], errors.RESUME_REJECTED)
        self.stack.clock.advance(0.001)
        self.stack.login("alice")

    def test_kick_without_ban_keeps_tokens(self):
        session, connection, resp = self.stack.login("alice")
        self.stack.clock.advance(1)
        self.stack.players.kick("alice", "admin", "x")
        _, c1 = self.resume(resp["resume_token"])
        self.assertEqual(self.answer(c1)["t"], "resp")

    def test_offline_player_banned(self):
        """
        A player without a session is banned all the same.
        """
        session, connection, resp = self.stack.login("alice")
        session.lost()
        self.stack.clock.advance(1)
        self.assertFalse(self.stack.players.kick("alice", "admin", "x",
                                                 ban_seconds=60))
        self.assertFalse(self.stack.players.kick("ghost", "admin", "x",
                                                 ban_seconds=60))
        _, c1 = self.resume(resp["resume_token"])
        self.assertEqual(self.answer(c1)["code"], errors.AUTH_FAILED)
        other, c2 = self.stack.connect()
        self.stack.send(other, t="login", id=1, data={"name": "ghost"})
        self.assertEqual(self.answer(c2)["code"], errors.AUTH_FAILED)
        self.assertIsNone(self.stack.players.get("ghost"))

    def test_banned_during_bind(self):
        """
        A bind under way when the ban comes (the directory has not answered
        yet) ends refused, the player offline.
        """
        stack = Stack(hold_directory=("claim",))
        session, connection = stack.connect()
        stack.send(session, t="login", id=1, data={"name": "alice"})
        stack.players.kick("alice", "admin", "x", ban_seconds=60)
        stack.directory.fire("claim")
        self.assertEqual(connection.messages[-1]["code"], errors.AUTH_FAILED)
        self.assertIsNone(session.player)
        self.assertIsNone(stack.players.get("alice").session)

    def test_revocation_by_another_gate(self):
        """
        Tokens are checked against the bans' revocation time, not only the
        player's state here: a ban recorded elsewhere (a shared store)
        revokes them too.
        """
        session, connection, resp = self.stack.login("alice")
        session.lost()
        self.stack.clock.advance(1)
        self.stack.players.bans.ban("alice", self.stack.clock.seconds())
        _, c1 = self.resume(resp["resume_token"])
        self.assertEqual(self.answer(c1)["code"], errors.RESUME_REJECTED)
