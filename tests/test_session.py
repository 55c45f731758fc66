"""
Tests for L{gate.session}: what one client connection sees (PROTOCOL.md
sections 2 and 3) - login, auth and resume, the ordered request lane,
delivery of pushes around a resume, heartbeats and errors - driven through
a L{FakeConnection}, a scripted backend and a L{Clock}; and the TCP and
WebSocket protocols as L{IClientConnection}s.
"""

import base64
import hashlib
import json
import os
import struct

import jwt
import txaio
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gate import errors
from gate.errors import GateError
from gate.framing import frame
from gate.interfaces import IClientConnection
from gate.tcp import GateTCPFactory
from gate.websocket import GateWebSocketFactory

from tests.fakes import AUTH_SECRET, FakeConnection, Stack


def auth_token(sub, exp, secret=AUTH_SECRET, algorithm="HS256"):
    return jwt.encode({"sub": sub, "exp": exp}, secret, algorithm=algorithm)


def kinds(messages):
    return [m["t"] for m in messages]


class ConnectionTests(SynchronousTestCase):
    def test_fake_connection_is_a_connection(self):
        self.assertTrue(verifyObject(IClientConnection, FakeConnection()))

    def test_open(self):
        stack = Stack()
        stack.clock.advance(3)
        session, connection = stack.connect("ws", "1.2.3.4:5")
        self.assertIs(stack.sessions.sessions[session.id], session)
        self.assertEqual((session.transport_name, session.peer, session.since),
                         ("ws", "1.2.3.4:5", 3))
        self.assertIsNone(session.player_id)
        other, _ = stack.connect()
        self.assertNotEqual(session.id, other.id)

    def test_lost(self):
        stack = Stack()
        session, connection = stack.connect()
        session.lost()
        self.assertNotIn(session.id, stack.sessions.sessions)
        self.assertTrue(session.closed)
        session.lost()
        stack.send(session, t="ping", ts=1)
        self.assertEqual(connection.sent, [])
        self.assertEqual([c for c in stack.clock.getDelayedCalls()
                          if c.func == session._check_heartbeat], [])

    def test_wait_empty(self):
        stack = Stack()
        self.successResultOf(stack.sessions.wait_empty())
        s1, _ = stack.connect()
        s2, _ = stack.connect()
        d = stack.sessions.wait_empty()
        s1.lost()
        self.assertNoResult(d)
        s2.lost()
        self.successResultOf(d)

    def test_kick_all(self):
        stack = Stack()
        (s1, c1), (s2, c2) = stack.connect(), stack.connect()
        stack.sessions.kick_all("shutdown", "bye")
        for connection in (c1, c2):
            self.assertEqual(connection.messages,
                             [{"t": "kick", "reason": "shutdown", "msg": "bye"}])
            self.assertTrue(connection.closed)


class SimpleEnvelopeTests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack()
        self.session, self.connection = self.stack.connect()

    def test_ping(self):
        self.stack.send(self.session, t="ping", ts=12.5)
        self.stack.send(self.session, t="ping", ts="abc")
        self.stack.send(self.session, t="ping")
        self.assertEqual(self.connection.messages,
                         [{"t": "pong", "ts": 12.5}, {"t": "pong", "ts": "abc"},
                          {"t": "pong", "ts": None}])

    def test_pong_answers_nothing(self):
        self.stack.send(self.session, t="pong", ts=1)
        self.assertEqual(self.connection.sent, [])

    def test_unknown_type(self):
        self.stack.send(self.session, t="warp", id=4)
        (message,) = self.connection.messages
        self.assertEqual((message["t"], message["id"], message["code"]),
                         ("err", 4, errors.UNKNOWN_TYPE))
        self.assertFalse(self.connection.closed)

    def test_bad_request_keeps_connection(self):
        self.stack.send(self.session, t="req", id=9, route="../x")
        self.stack.send(self.session, t="auth", id="x", token="t")
        first, second = self.connection.messages
        self.assertEqual((first["t"], first["id"], first["code"]),
                         ("err", 9, errors.BAD_REQUEST))
        self.assertEqual((second["code"], "id" in second),
                         (errors.BAD_REQUEST, False))
        self.assertFalse(self.connection.closed)

    def test_bad_json_closes(self):
        self.session.receive(b"[1, 2]")
        (message,) = self.connection.messages
        self.assertEqual((message["t"], message["code"]), ("err", errors.BAD_JSON))
        self.assertNotIn("id", message)
        self.assertTrue(self.connection.closed)
        # Nothing more is read or sent.
        self.stack.send(self.session, t="ping")
        self.assertEqual(len(self.connection.sent), 1)

    def test_invalid_utf8_closes(self):
        self.session.receive(b'{"t": "ping", "ts": "\xff"}')
        self.assertEqual(self.connection.messages[0]["code"], errors.BAD_JSON)
        self.assertTrue(self.connection.closed)

    def test_overflowing_number(self):
        """
        A ping whose C{ts} overflows to infinity is refused like other bad
        JSON; it does not escape as an exception from C{receive}.
        """
        self.session.receive(b'{"t": "ping", "ts": 1e999}')
        (message,) = self.connection.messages
        self.assertEqual((message["t"], message["code"]),
                         ("err", errors.BAD_JSON))
        self.assertTrue(self.connection.closed)

    def test_frame_too_large(self):
        self.session.frame_too_large(70000, 65536)
        (message,) = self.connection.messages
        self.assertEqual(message["code"], errors.FRAME_TOO_LARGE)
        self.assertIn("70000", message["msg"])
        self.assertTrue(self.connection.closed)

    def test_req_before_login(self):
        self.stack.send(self.session, t="req", id=3, route="echo", data=1)
        self.assertEqual(self.connection.messages,
                         [{"t": "err", "id": 3, "code": errors.NOT_AUTHENTICATED,
                           "msg": self.connection.messages[0]["msg"]}])
        self.assertEqual(self.stack.backend.calls, [])

    def test_ack_before_login_ignored(self):
        self.stack.send(self.session, t="ack", seq=5)
        self.assertEqual(self.connection.sent, [])


class LoginTests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack()

    def test_login(self):
        session, connection = self.stack.connect()
        self.stack.send(session, t="login", id=7, data={"name": "alice"})
        (login,) = self.stack.backend.logins
        self.assertEqual(login.args, (session.id, {"name": "alice"}))
        (answer,) = connection.messages
        self.assertEqual(answer["t"], "resp")
        self.assertEqual(answer["id"], 7)
        self.assertEqual(answer["data"], {"welcome": "alice"})
        self.assertEqual(answer["player_id"], "alice")
        self.assertEqual(answer["last_seq"], 0)
        self.stack.tokens.check_resume_token(answer["resume_token"], "alice")
        self.assertEqual(session.player_id, "alice")

    def test_login_last_seq(self):
        s1, _, _ = self.stack.login("alice")
        for _ in range(3):
            self.stack.push(["alice"])
        s1.lost()
        _, _, answer = self.stack.login("alice")
        self.assertEqual(answer["last_seq"], 3)

    def test_login_does_not_replay(self):
        """
        A plain login answers with C{last_seq}; the mailbox is for resume.
        """
        s1, _, _ = self.stack.login("alice")
        s1.lost()
        self.stack.push(["alice"])
        s2, c2, _ = self.stack.login("alice")
        self.assertEqual(kinds(c2.messages), ["resp"])

    def test_login_refused(self):
        self.stack.backend.auto_login = False
        session, connection = self.stack.connect()
        self.stack.send(session, t="login", id=2, data={"name": "x"})
        self.stack.backend.logins[0].d.errback(
            GateError(errors.AUTH_FAILED, "wrong password"))
        self.assertEqual(connection.messages,
                         [{"t": "err", "id": 2, "code": errors.AUTH_FAILED,
                           "msg": "wrong password"}])
        self.assertIsNone(session.player)
        self.assertFalse(connection.closed)
        self.stack.send(session, t="req", id=3, route="echo")
        self.assertEqual(connection.messages[-1]["code"],
                         errors.NOT_AUTHENTICATED)

    def test_login_backend_errors(self):
        self.stack.backend.auto_login = False
        session, connection = self.stack.connect()
        for rid, code in enumerate((errors.BACKEND_UNAVAILABLE,
                                    errors.BACKEND_TIMEOUT,
                                    errors.BACKEND_ERROR, "banned")):
            self.stack.send(session, t="login", id=rid, data={})
            self.stack.backend.logins[-1].d.errback(GateError(code, "m"))
            self.assertEqual(connection.messages[-1],
                             {"t": "err", "id": rid, "code": code, "msg": "m"})

    def test_login_unexpected_failure_is_internal(self):
        self.stack.backend.auto_login = False
        session, connection = self.stack.connect()
        self.stack.send(session, t="login", id=2, data={})
        self.stack.backend.logins[0].d.errback(ZeroDivisionError())
        self.assertEqual(connection.messages[-1]["code"], errors.INTERNAL)
        self.assertEqual(connection.messages[-1]["id"], 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_auth(self):
        session, connection = self.stack.connect()
        self.stack.send(session, t="auth", id=5, token=auth_token("bob", 100))
        (answer,) = connection.messages
        self.assertEqual((answer["t"], answer["id"], answer["data"],
                          answer["player_id"], answer["last_seq"]),
                         ("resp", 5, None, "bob", 0))
        self.stack.tokens.check_resume_token(answer["resume_token"], "bob")
        self.assertEqual(session.player_id, "bob")
        self.assertEqual(self.stack.backend.logins, [])

    def test_auth_expired(self):
        token = auth_token("bob", 100)
        self.stack.clock.advance(100)
        session, connection = self.stack.connect()
        self.stack.send(session, t="auth", id=5, token=token)
        (answer,) = connection.messages
        self.assertEqual((answer["t"], answer["id"], answer["code"]),
                         ("err", 5, errors.AUTH_FAILED))
        self.assertIsNone(session.player)

    def test_auth_bad_tokens(self):
        session, connection = self.stack.connect()
        bad = [auth_token("bob", 100, secret="x" * 40),
               jwt.encode({"sub": "bob"}, AUTH_SECRET, algorithm="HS256"),
               jwt.encode({"exp": 100}, AUTH_SECRET, algorithm="HS256"),
               jwt.encode({"sub": "bob", "exp": 100}, None, algorithm="none"),
               self.stack.tokens.resume_token("bob"),
               "garbage"]
        for rid, token in enumerate(bad):
            self.stack.send(session, t="auth", id=rid, token=token)
        self.assertEqual([(m["id"], m["code"]) for m in connection.messages],
                         [(rid, errors.AUTH_FAILED) for rid in range(len(bad))])
        self.assertIsNone(session.player)

    def test_racing_logins_answered_out_of_order(self):
        """
        Two logins of one player on two connections, the backend answering
        the second first: exactly one session ends bound, the other is told
        it was replaced.
        """
        self.stack.backend.auto_login = False
        s1, c1 = self.stack.connect()
        s2, c2 = self.stack.connect()
        self.stack.send(s1, t="login", id=1, data={"name": "alice"})
        self.stack.send(s2, t="login", id=1, data={"name": "alice"})
        first, second = self.stack.backend.logins
        second.d.callback(("alice", None))
        first.d.callback(("alice", None))
        player = self.stack.players.get("alice")
        self.assertIs(player.session, s1)
        self.assertIsNone(s2.player)
        self.assertEqual(kinds(c2.messages), ["resp", "kick"])
        self.assertEqual(c2.messages[1]["reason"], "replaced")
        self.assertEqual(kinds(c1.messages), ["resp"])
        self.assertEqual(self.stack.players.online, 1)

    def test_busy_pool(self):
        """
        A login that finds the worker pool's queue full is answered busy.
        """
        stack = Stack(workers__min=1, workers__max=1, workers__max_queue=1)
        stack.backend.auto_login = False
        sessions = [stack.connect() for _ in range(3)]
        for session, _ in sessions:
            stack.send(session, t="login", id=1, data={"name": "x"})
        self.assertEqual(len(stack.backend.logins), 1)
        self.assertEqual(sessions[0][1].messages, [])
        self.assertEqual(sessions[1][1].messages, [])
        self.assertEqual(sessions[2][1].messages[0]["code"], errors.BUSY)
        self.assertEqual(sessions[2][1].messages[0]["id"], 1)


class ResumeTests(SynchronousTestCase):
    def offline_with_pushes(self, stack, n, player="alice"):
        """
        Log C{player} in, disconnect, push C{n} persistent messages; return
        the resume token of the login.
        """
        session, _, answer = stack.login(player)
        session.lost()
        for i in range(n):
            stack.push([player], "note", {"n": i + 1})
        return answer["resume_token"]

    def resume(self, stack, token, last_seq, player="alice", rid=50):
        session, connection = stack.connect()
        stack.send(session, t="resume", id=rid, player_id=player,
                   resume_token=token, last_seq=last_seq)
        return session, connection

    def test_resume_replays_after_last_seq_in_order(self):
        stack = Stack()
        token = self.offline_with_pushes(stack, 5)
        session, connection = self.resume(stack, token, 2)
        messages = connection.messages
        self.assertEqual(kinds(messages), ["resp", "push", "push", "push"])
        resp = messages[0]
        self.assertEqual((resp["id"], resp["player_id"], resp["last_seq"],
                          resp["data"]), (50, "alice", 5, None))
        stack.tokens.check_resume_token(resp["resume_token"], "alice")
        self.assertEqual([(m["seq"], m["data"]) for m in messages[1:]],
                         [(3, {"n": 3}), (4, {"n": 4}), (5, {"n": 5})])
        self.assertEqual(messages[1]["route"], "note")
        self.assertIs(stack.players.get("alice").session, session)
        # Then live pushes, numbered on.
        stack.push(["alice"], "note", "live")
        self.assertEqual(connection.messages[-1]["seq"], 6)

    def test_resume_nothing_new(self):
        stack = Stack()
        token = self.offline_with_pushes(stack, 2)
        _, connection = self.resume(stack, token, 2)
        self.assertEqual(kinds(connection.messages), ["resp"])

    def test_resume_gap_first(self):
        stack = Stack(player__mailbox_max=2)
        token = self.offline_with_pushes(stack, 5)
        _, connection = self.resume(stack, token, 1)
        messages = connection.messages
        self.assertEqual(kinds(messages), ["resp", "gap", "push", "push"])
        self.assertEqual(messages[1], {"t": "gap", "from": 2, "to": 3})
        self.assertEqual([m["seq"] for m in messages[2:]], [4, 5])

    def test_resume_gap_by_age(self):
        """
        Pushes older than C{player.idle_timeout} are dropped even when the
        player came back in between (and so did not expire).
        """
        stack = Stack(player__idle_timeout=100)
        session, _, answer = stack.login("alice")
        session.lost()
        stack.push(["alice"])
        stack.clock.advance(60)
        session, _, answer = stack.login("alice")
        session.lost()
        stack.push(["alice"])
        stack.clock.advance(40)
        _, connection = self.resume(stack, answer["resume_token"], 0)
        messages = connection.messages
        self.assertEqual(kinds(messages), ["resp", "gap", "push"])
        self.assertEqual(messages[1], {"t": "gap", "from": 1, "to": 1})
        self.assertEqual(messages[2]["seq"], 2)

    def test_acked_not_replayed(self):
        stack = Stack()
        s1, c1, answer = stack.login("alice")
        for _ in range(4):
            stack.push(["alice"])
        stack.send(s1, t="ack", seq=3)
        self.assertEqual(self.successResultOf(stack.mailboxes.size("alice")), 1)
        s1.lost()
        _, connection = self.resume(stack, answer["resume_token"], 0)
        messages = connection.messages
        self.assertEqual(kinds(messages), ["resp", "push"])
        self.assertEqual(messages[1]["seq"], 4)

    def test_transient_never_queued(self):
        stack = Stack()
        token = self.offline_with_pushes(stack, 0)
        result = stack.push(["alice"], "fx", 1, persist=False)
        self.assertEqual(result.dropped, 1)
        stack.players.broadcast("news", 2)
        _, connection = self.resume(stack, token, 0)
        self.assertEqual(kinds(connection.messages), ["resp"])
        self.assertEqual(connection.messages[0]["last_seq"], 0)

    def test_resume_replaces_live_session(self):
        stack = Stack()
        s1, c1, answer = stack.login("alice")
        stack.push(["alice"])
        s2, c2 = self.resume(stack, answer["resume_token"], 0)
        self.assertEqual(c1.messages[-1]["reason"], "replaced")
        self.assertEqual(kinds(c2.messages), ["resp", "push"])
        self.assertIs(stack.players.get("alice").session, s2)

    def test_resume_rejected(self):
        stack = Stack()
        token = self.offline_with_pushes(stack, 1)
        self.offline_with_pushes(stack, 0, player="bob")
        cases = [("alice", "not-a-token"),
                 ("bob", token),                         # alice's token
                 ("alice", auth_token("alice", 10**9)),  # an auth token
                 ("ghost", stack.tokens.resume_token("ghost"))]  # unknown
        session, connection = stack.connect()
        for rid, (player, tok) in enumerate(cases):
            stack.send(session, t="resume", id=rid, player_id=player,
                       resume_token=tok, last_seq=0)
        self.assertEqual([(m["t"], m["id"], m["code"])
                          for m in connection.messages],
                         [("err", rid, errors.RESUME_REJECTED)
                          for rid in range(len(cases))])
        self.assertIsNone(session.player)
        self.assertIsNone(stack.players.get("ghost"))

    def test_resume_token_expired(self):
        stack = Stack(auth__resume_ttl=50, player__idle_timeout=1000)
        token = self.offline_with_pushes(stack, 1)
        stack.clock.advance(50)
        _, connection = self.resume(stack, token, 0)
        self.assertEqual(connection.messages[0]["code"], errors.RESUME_REJECTED)

    def test_resume_after_expiry_rejected(self):
        stack = Stack(player__idle_timeout=100)
        token = self.offline_with_pushes(stack, 1)
        stack.clock.advance(100)
        _, connection = self.resume(stack, token, 0)
        self.assertEqual(connection.messages[0]["code"], errors.RESUME_REJECTED)


    def test_resume_token_of_earlier_incarnation_rejected(self):
        """
        A resume token issued before the player expired does not resume the
        player created again since (whose seqs started over): the client
        must log in afresh rather than miss pushes numbered anew.
        """
        stack = Stack(player__idle_timeout=100)
        token = self.offline_with_pushes(stack, 3)
        stack.clock.advance(100)
        session, _, answer = stack.login("alice")
        stack.push(["alice"], "note", "new")
        _, connection = self.resume(stack, token, 3)
        self.assertEqual(connection.messages[0]["code"], errors.RESUME_REJECTED)
        self.assertIs(stack.players.get("alice").session, session)
        # The new incarnation's own token resumes.
        session.lost()
        _, connection = self.resume(stack, answer["resume_token"], 0)
        self.assertEqual(kinds(connection.messages), ["resp", "push"])


class ResumeRaceTests(SynchronousTestCase):
    """
    A push that arrives while a resume replays the mailbox, with a store
    that answers late: delivered exactly once, after the replay.
    """

    def setUp(self):
        self.stack = Stack(hold_mailbox=("append", "last_seq", "read_after"))
        self.mailboxes = self.stack.mailboxes
        self.mailboxes.hold = set()
        _, _, answer = self.stack.login("alice")
        self.stack.players.get("alice").session.lost()
        for i in range(3):
            self.stack.push(["alice"], "note", i + 1)
        self.mailboxes.hold = {"append", "last_seq", "read_after"}
        self.token = answer["resume_token"]
        self.session, self.connection = self.stack.connect()
        self.stack.send(self.session, t="resume", id=9, player_id="alice",
                        resume_token=self.token, last_seq=1)
        self.assertEqual(self.connection.messages, [])

    def live_push(self):
        results = []
        self.stack.players.push(["alice"], "live", "L").addBoth(results.append)
        return results

    def seqs(self):
        return [(m["t"], m.get("seq")) for m in self.connection.messages]

    def test_append_answered_during_replay(self):
        results = self.live_push()
        self.mailboxes.fire("append")
        self.assertEqual(results[0].delivered, 1)
        self.assertEqual(self.connection.messages, [])
        self.mailboxes.fire("last_seq")
        self.mailboxes.fire("read_after")
        self.assertEqual(self.seqs(), [("resp", None), ("push", 2),
                                       ("push", 3), ("push", 4)])
        # Highest seq when the resume read it; push 4 was stored after.
        self.assertEqual(self.connection.messages[0]["last_seq"], 3)
        self.assertEqual(self.connection.messages[-1]["data"], "L")

    def test_read_before_append(self):
        """
        The replay read the mailbox before the push was stored: the push
        comes after it, once.
        """
        self.mailboxes.fire("last_seq")
        results = self.live_push()
        self.mailboxes.fire("append")
        self.assertEqual(self.seqs(), [("resp", None)])
        self.mailboxes.fire("read_after")
        self.assertEqual(self.seqs(), [("resp", None), ("push", 2),
                                       ("push", 3), ("push", 4)])
        self.assertEqual(results[0].delivered, 1)

    def test_append_answered_after_replay(self):
        results = self.live_push()
        self.mailboxes.fire("last_seq")
        self.mailboxes.fire("read_after")
        self.assertEqual(self.seqs(), [("resp", None), ("push", 2),
                                       ("push", 3), ("push", 4)])
        self.mailboxes.fire("append")
        self.assertEqual(self.seqs(), [("resp", None), ("push", 2),
                                       ("push", 3), ("push", 4)])
        self.assertEqual(results[0].delivered, 1)

    def test_several_pushes_during_replay(self):
        first = self.live_push()
        self.mailboxes.fire("last_seq")
        second = self.live_push()
        self.mailboxes.fire("append")
        self.mailboxes.fire("append")
        third = self.live_push()
        self.mailboxes.fire("read_after")
        self.mailboxes.fire("append")
        self.assertEqual([m.get("seq") for m in self.connection.messages],
                         [None, 2, 3, 4, 5, 6])
        for r in (first, second, third):
            self.assertEqual(r[0].delivered, 1)

    def test_transient_during_replay_after_it(self):
        self.stack.players.push(["alice"], "fx", "T", persist=False)
        self.stack.players.broadcast("news", "B")
        self.assertEqual(self.connection.messages, [])
        self.mailboxes.fire_all()
        self.assertEqual([(m["t"], m.get("seq"), m["data"] if m["t"] == "push"
                           else None) for m in self.connection.messages],
                         [("resp", None, None), ("push", 2, 2), ("push", 3, 3),
                          ("push", None, "T"), ("push", None, "B")])

    def test_nothing_after_kick_during_replay(self):
        """
        A session kicked while its resume reads the mailbox gets nothing
        after the C{kick}: the gate closes it right after.
        """
        self.mailboxes.fire("last_seq")
        self.assertEqual(self.seqs(), [("resp", None)])
        self.stack.players.kick("alice", "admin", "bye")
        self.mailboxes.fire("read_after")
        self.assertEqual(self.seqs(), [("resp", None), ("kick", None)])

    def test_nothing_after_replaced_during_replay(self):
        self.mailboxes.fire("last_seq")
        self.mailboxes.hold = set()
        other, other_connection, _ = self.stack.login("alice")
        self.mailboxes.fire("read_after")
        self.assertEqual(self.seqs(), [("resp", None), ("kick", None)])
        self.assertEqual(self.connection.messages[1]["reason"], "replaced")
        self.assertIs(self.stack.players.get("alice").session, other)

    def test_resume_twice_on_one_connection(self):
        """
        Each retained push reaches a connection once, even when it resumes
        again from the same seq.
        """
        self.mailboxes.fire_all()
        self.mailboxes.hold = set()
        self.stack.send(self.session, t="resume", id=10, player_id="alice",
                        resume_token=self.token, last_seq=1)
        self.assertEqual(self.seqs(), [("resp", None), ("push", 2),
                                       ("push", 3), ("resp", None)])

    def test_gap_during_race(self):
        """
        With retention dropping pushes, the gap comes before every replayed
        and held push.
        """
        stack = Stack(hold_mailbox=("last_seq", "read_after"),
                      player__mailbox_max=2)
        stack.mailboxes.hold = set()
        s, _, answer = stack.login("alice")
        s.lost()
        for i in range(4):
            stack.push(["alice"])
        stack.mailboxes.hold = {"last_seq", "read_after"}
        session, connection = stack.connect()
        stack.send(session, t="resume", id=1, player_id="alice",
                   resume_token=answer["resume_token"], last_seq=0)
        stack.push(["alice"])
        self.assertEqual(connection.messages, [])
        stack.mailboxes.fire_all()
        messages = connection.messages
        # Retained when the replay read: 4 and the live 5; 5 once.
        self.assertEqual(kinds(messages), ["resp", "gap", "push", "push"])
        self.assertEqual(messages[1], {"t": "gap", "from": 1, "to": 3})
        self.assertEqual([m["seq"] for m in messages[2:]], [4, 5])


class SwitchPlayerTests(SynchronousTestCase):
    def test_pushes_of_second_player_delivered(self):
        """
        A session that logs in as another player gets that player's pushes,
        although their seqs restart below those it saw for the first one.
        """
        stack = Stack()
        session, connection, _ = stack.login("alice")
        for _ in range(3):
            stack.push(["alice"])
        stack.login("bob", session=session)
        result = stack.push(["bob"], "note", "for bob")
        self.assertEqual(result.delivered, 1)
        pushes = [(m["seq"], m["data"]) for m in connection.messages
                  if m["t"] == "push"]
        self.assertEqual(pushes, [(1, None), (2, None), (3, None),
                                  (1, "for bob")])


class RequestTests(SynchronousTestCase):
    def setUp(self):
        self.stack = Stack()
        self.s1, self.c1, _ = self.stack.login("alice")

    def test_req(self):
        self.stack.send(self.s1, t="req", id=11, route="shop.buy",
                        data={"item": 3})
        (call,) = self.stack.backend.calls
        self.assertEqual(call.args, (self.s1.id, "alice", 11, "shop.buy",
                                     {"item": 3}))
        call.d.callback({"ok": True})
        self.assertEqual(self.c1.messages[-1],
                         {"t": "resp", "id": 11, "data": {"ok": True}})

    def test_order_within_session(self):
        """
        A session's requests reach the backend one at a time, in order, and
        are answered in that order.
        """
        for rid in (1, 2, 3):
            self.stack.send(self.s1, t="req", id=rid, route="r", data=rid)
        self.assertEqual([c.args[2] for c in self.stack.backend.calls], [1])
        self.stack.backend.calls[0].d.callback("a1")
        self.assertEqual([c.args[2] for c in self.stack.backend.calls], [1, 2])
        self.stack.backend.calls[1].d.callback("a2")
        self.stack.backend.calls[2].d.callback("a3")
        answers = [(m["id"], m["data"]) for m in self.c1.messages
                   if m["t"] == "resp" and "player_id" not in m]
        self.assertEqual(answers, [(1, "a1"), (2, "a2"), (3, "a3")])

    def test_sessions_do_not_wait_for_each_other(self):
        """
        With a backend answering out of order across sessions, each
        session's replies come as soon as its own calls are answered, in its
        own order.
        """
        s2, c2, _ = self.stack.login("bob")
        self.stack.send(self.s1, t="req", id=1, route="slow")
        self.stack.send(self.s1, t="req", id=2, route="slow")
        self.stack.send(s2, t="req", id=1, route="fast")
        self.stack.send(s2, t="req", id=2, route="fast")
        calls = self.stack.backend.calls
        self.assertEqual([(c.args[1], c.args[2]) for c in calls],
                         [("alice", 1), ("bob", 1)])
        calls[1].d.callback("b1")
        self.assertEqual([(c.args[1], c.args[2]) for c in calls],
                         [("alice", 1), ("bob", 1), ("bob", 2)])
        calls[2].d.callback("b2")
        self.assertEqual([(m["id"], m["data"]) for m in c2.messages[1:]],
                         [(1, "b1"), (2, "b2")])
        self.assertEqual(self.c1.messages[1:], [])
        calls[0].d.callback("a1")
        calls[3].d.callback("a2")
        self.assertEqual([(m["id"], m["data"]) for m in self.c1.messages[1:]],
                         [(1, "a1"), (2, "a2")])

    def test_error_does_not_stop_lane(self):
        self.stack.send(self.s1, t="req", id=1, route="r")
        self.stack.send(self.s1, t="req", id=2, route="r")
        self.stack.backend.calls[0].d.errback(
            GateError("not_enough_gold", "you need 5 more"))
        self.stack.backend.calls[1].d.callback("ok")
        self.assertEqual(self.c1.messages[1:],
                         [{"t": "err", "id": 1, "code": "not_enough_gold",
                           "msg": "you need 5 more"},
                          {"t": "resp", "id": 2, "data": "ok"}])

    def test_errors_mapped(self):
        for rid, code in enumerate((errors.BACKEND_UNAVAILABLE,
                                    errors.BACKEND_TIMEOUT,
                                    errors.BACKEND_ERROR,
                                    errors.ROUTE_NOT_FOUND)):
            self.stack.send(self.s1, t="req", id=rid, route="r")
            self.stack.backend.calls[-1].d.errback(GateError(code, "why"))
            self.assertEqual(self.c1.messages[-1],
                             {"t": "err", "id": rid, "code": code, "msg": "why"})

    def test_unexpected_error_is_internal(self):
        self.stack.send(self.s1, t="req", id=4, route="r")
        self.stack.backend.calls[0].d.errback(KeyError("oops"))
        message = self.c1.messages[-1]
        self.assertEqual((message["id"], message["code"]), (4, errors.INTERNAL))
        self.assertNotIn("oops", message["msg"])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertFalse(self.c1.closed)

    def test_max_inflight(self):
        stack = Stack(session__max_inflight=2)
        session, connection, _ = stack.login("alice")
        for rid in (1, 2, 3):
            stack.send(session, t="req", id=rid, route="r")
        self.assertEqual(connection.messages[-1]["id"], 3)
        self.assertEqual(connection.messages[-1]["code"], errors.BUSY)
        self.assertEqual(len(stack.backend.calls), 1)
        stack.backend.calls[0].d.callback(None)
        stack.send(session, t="req", id=4, route="r")
        self.assertEqual(kinds(connection.messages[1:]), ["err", "resp"])
        stack.backend.calls[1].d.callback(None)
        stack.backend.calls[2].d.callback(None)
        self.assertEqual([m["id"] for m in connection.messages[1:]],
                         [3, 1, 2, 4])

    def test_pool_busy(self):
        stack = Stack(workers__min=1, workers__max=1, workers__max_queue=1)
        s1, c1, _ = stack.login("a")
        s2, c2, _ = stack.login("b")
        s3, c3, _ = stack.login("c")
        for session in (s1, s2, s3):
            stack.send(session, t="req", id=5, route="r")
        self.assertEqual(c3.messages[-1]["code"], errors.BUSY)
        self.assertEqual(c3.messages[-1]["id"], 5)
        stack.backend.calls[0].d.callback(1)
        stack.backend.calls[1].d.callback(2)
        self.assertEqual(c1.messages[-1], {"t": "resp", "id": 5, "data": 1})
        self.assertEqual(c2.messages[-1], {"t": "resp", "id": 5, "data": 2})

    def test_answer_after_disconnect_dropped(self):
        self.stack.send(self.s1, t="req", id=1, route="r")
        self.stack.send(self.s1, t="req", id=2, route="r")
        self.s1.lost()
        before = len(self.c1.sent)
        self.stack.backend.calls[0].d.callback("late")
        self.assertEqual(len(self.c1.sent), before)
        self.assertEqual(len(self.stack.backend.calls), 1)

    def test_ack_trims_mailbox(self):
        for _ in range(3):
            self.stack.push(["alice"])
        self.stack.send(self.s1, t="ack", seq=2)
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.size("alice")), 1)
        self.assertEqual(self.c1.messages[-1]["seq"], 3)


class PushDeliveryTests(SynchronousTestCase):
    def test_duplicate_seq_not_resent(self):
        stack = Stack()
        session, connection, _ = stack.login("alice")
        stack.push(["alice"])
        template = connection.sent[-1]
        session.push(template)
        self.assertEqual(len([m for m in connection.messages
                              if m["t"] == "push"]), 1)

    def test_pushes_after_kick_dropped(self):
        stack = Stack()
        session, connection, _ = stack.login("alice")
        session.kick("admin", "bye")
        before = len(connection.sent)
        session.push(connection.sent[0])
        session.send(connection.sent[0])
        self.assertEqual(len(connection.sent), before)

    def test_kick_reason_metrics(self):
        from gate.metrics import Metrics
        stack = Stack()
        stack.sessions._metrics = Metrics("g")
        session, connection = stack.connect()
        session.kick("admin", "bye")
        session.kick("idle", "again")
        self.assertEqual(connection.messages,
                         [{"t": "kick", "reason": "admin", "msg": "bye"}])
        self.assertEqual(stack.sessions._metrics.registry.get_sample_value(
            "mmogate_kicks_total", {"reason": "admin"}), 1)


class HeartbeatTests(SynchronousTestCase):
    def setUp(self):
        # Unbound sessions here: the login timeout must not close them.
        self.stack = Stack(session__heartbeat_ttl=60,
                           session__login_timeout=1000)
        self.session, self.connection = self.stack.connect()
        self.clock = self.stack.clock

    def test_ping_at_half_and_kick_at_ttl(self):
        self.clock.advance(29.9)
        self.assertEqual(self.connection.sent, [])
        self.clock.advance(0.1)
        self.assertEqual(self.connection.messages, [{"t": "ping", "ts": 30.0}])
        self.clock.advance(29.9)
        self.assertEqual(len(self.connection.sent), 1)
        self.assertFalse(self.connection.closed)
        self.clock.advance(0.1)
        self.assertEqual(self.connection.messages[1],
                         {"t": "kick", "reason": "idle",
                          "msg": self.connection.messages[1]["msg"]})
        self.assertTrue(self.connection.closed)
        self.assertEqual(self.heartbeats(), [])

    def heartbeats(self):
        return [c for c in self.clock.getDelayedCalls()
                if c.func == self.session._check_heartbeat]

    def test_activity_postpones(self):
        self.clock.advance(20)
        self.stack.send(self.session, t="pong", ts=1)
        self.clock.advance(29.9)
        self.assertEqual(self.connection.sent, [])
        self.clock.advance(0.1)
        self.assertEqual(kinds(self.connection.messages), ["ping"])
        self.clock.advance(10)
        self.stack.send(self.session, t="pong", ts=30)
        self.clock.advance(59.9)
        self.assertFalse(self.connection.closed)
        self.assertEqual(kinds(self.connection.messages), ["ping", "ping"])
        self.clock.advance(30)
        self.assertTrue(self.connection.closed)
        self.assertEqual(self.connection.messages[-1]["reason"], "idle")

    def test_any_payload_counts(self):
        """
        Even a malformed envelope shows the client is alive.
        """
        for _ in range(5):
            self.clock.advance(25)
            self.stack.send(self.session, t="nonsense")
        self.assertFalse(self.connection.closed)
        self.assertNotIn("ping", kinds(self.connection.messages))

    def test_lost_cancels(self):
        self.assertEqual(len(self.heartbeats()), 1)
        self.session.lost()
        self.assertEqual(self.heartbeats(), [])

    def test_idle_player_goes_offline(self):
        stack = Stack(session__heartbeat_ttl=10)
        session, connection, _ = stack.login("alice")
        stack.clock.advance(5)
        stack.clock.advance(5)
        self.assertEqual(connection.messages[-1]["reason"], "idle")
        session.lost()
        self.assertIsNone(stack.players.get("alice").session)


class TCPProtocolTests(SynchronousTestCase):
    """
    The TCP protocol as an L{IClientConnection}: frames in, frames out.
    """

    def connect(self, **changes):
        self.stack = Stack(**changes)
        factory = GateTCPFactory(self.stack.sessions,
                                 self.stack.config["session.max_frame"],
                                 self.stack.clock)
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 999))
        transport = StringTransport(
            peerAddress=IPv4Address("TCP", "10.1.2.3", 999))
        protocol.makeConnection(transport)
        return protocol, transport

    def read(self, transport):
        data = transport.value()
        transport.clear()
        out = []
        while data:
            (size,) = struct.unpack(">I", data[:4])
            out.append(json.loads(data[4:4 + size]))
            data = data[4 + size:]
        return out

    def test_interface(self):
        protocol, _ = self.connect()
        self.assertTrue(verifyObject(IClientConnection, protocol))
        self.assertEqual(protocol.peer, "10.1.2.3:999")
        self.assertEqual(protocol.transport_name, "tcp")

    def test_frames(self):
        protocol, transport = self.connect()
        data = frame(b'{"t":"ping","ts":1}') + frame(b'{"t":"ping","ts":2}')
        for i in range(len(data)):
            protocol.dataReceived(data[i:i + 1])
        self.assertEqual(self.read(transport), [{"t": "pong", "ts": 1},
                                                {"t": "pong", "ts": 2}])

    def test_frame_too_large(self):
        protocol, transport = self.connect(session__max_frame=16)
        protocol.dataReceived(frame(b'{"t":"ping"}    '))
        self.assertEqual(self.read(transport), [{"t": "pong", "ts": None}])
        protocol, transport = self.connect(session__max_frame=16)
        protocol.dataReceived(struct.pack(">I", 17))
        (message,) = self.read(transport)
        self.assertEqual(message["code"], errors.FRAME_TOO_LARGE)
        self.assertTrue(transport.disconnecting)

    def test_no_reading_after_violation(self):
        protocol, transport = self.connect()
        protocol.dataReceived(frame(b"[]") + frame(b'{"t":"ping"}'))
        self.assertEqual([m["t"] for m in self.read(transport)], ["err"])

    def test_lost(self):
        protocol, transport = self.connect()
        session = protocol.session
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(session.closed)
        self.assertEqual(self.stack.sessions.sessions, {})

    def test_close_then_abort(self):
        protocol, transport = self.connect()
        protocol.session.kick("admin", "bye")
        self.assertTrue(transport.disconnecting)
        self.stack.clock.advance(9.9)
        self.assertFalse(transport.disconnected)
        self.stack.clock.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_refused_while_not_accepting(self):
        stack = Stack()
        factory = GateTCPFactory(stack.sessions, 100, stack.clock)
        stack.sessions.accepting = False
        protocol = factory.buildProtocol(IPv4Address("TCP", "1.1.1.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(stack.sessions.sessions, {})


class _WSTransport(StringTransport):
    """
    autobahn unregisters itself as producer when it fails a handshake,
    whether or not it registered; a real transport allows that.
    """

    def unregisterProducer(self):
        self.producer = None


class WebSocketProtocolTests(SynchronousTestCase):
    """
    The WebSocket protocol as an L{IClientConnection}, through a real
    opening handshake over a L{StringTransport}.
    """

    def setUp(self):
        self.stack = Stack()
        # autobahn schedules its timers through txaio's loop.
        self.patch(txaio.config, "loop", self.stack.clock)
        self.factory = GateWebSocketFactory(self.stack.sessions, 1024,
                                            self.stack.clock)
        self.factory.reactor = self.stack.clock

    def open(self, path="/ws"):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "10.9.8.7", 77))
        transport = _WSTransport(
            peerAddress=IPv4Address("TCP", "10.9.8.7", 77))
        protocol.makeConnection(transport)
        key = base64.b64encode(os.urandom(16))
        protocol.dataReceived(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gate\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = transport.value()
        transport.clear()
        return protocol, transport, head, key

    def client_frame(self, payload, opcode=1):
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked

    def test_handshake_and_interface(self):
        protocol, transport, head, key = self.open()
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        self.assertIn(accept, head)
        self.assertTrue(verifyObject(IClientConnection, protocol))
        self.assertEqual((protocol.transport_name, protocol.peer),
                         ("ws", "10.9.8.7:77"))
        self.assertIn(protocol.session.id, self.stack.sessions.sessions)

    def test_message_in_and_out(self):
        protocol, transport, _, _ = self.open()
        protocol.dataReceived(self.client_frame(b'{"t":"ping","ts":5}'))
        data = transport.value()
        self.assertEqual(data[0], 0x81)
        length = data[1]
        self.assertEqual(json.loads(data[2:2 + length]), {"t": "pong", "ts": 5})

    def test_binary_message(self):
        protocol, transport, _, _ = self.open()
        protocol.dataReceived(self.client_frame(b'{"t":"ping","ts":6}', 2))
        data = transport.value()
        self.assertEqual(json.loads(data[2:2 + data[1]]), {"t": "pong", "ts": 6})

    def test_wrong_path(self):
        protocol, transport, head, _ = self.open("/other")
        self.assertTrue(head.startswith(b"HTTP/1.1 404"), head)
        self.assertEqual(self.stack.sessions.sessions, {})


class ReplayFlowTests(SynchronousTestCase):
    """
    A resume's mailbox is written as fast as the client reads it.
    """

    def setUp(self):
        self.stack = Stack(session__max_outbuf=2048)
        session, _, answer = self.stack.login("alice")
        session.lost()
        for i in range(10):
            self.stack.push(["alice"], "note", {"n": i + 1})
        self.token = answer["resume_token"]

    def resume(self, paused_after):
        """
        Resume on a connection that reports itself full after
        C{paused_after} messages.
        """
        session, connection = self.stack.connect()
        send = connection.send

        def send_then_fill(outgoing):
            send(outgoing)
            if len(connection.sent) == paused_after:
                connection.paused = True

        connection.send = send_then_fill
        self.stack.send(session, t="resume", id=5, player_id="alice",
                        resume_token=self.token, last_seq=0)
        return session, connection

    def test_replay_waits_for_the_client(self):
        """
        While the connection is full the replay stops, live pushes wait
        behind it, and it goes on when the connection drains.
        """
        session, connection = self.resume(paused_after=4)
        self.assertEqual(kinds(connection.messages),
                         ["resp", "push", "push", "push"])
        self.stack.push(["alice"], "note", "live")
        self.assertEqual(len(connection.sent), 4)
        connection.paused = False
        session.writable()
        seqs = [m["seq"] for m in connection.messages if m["t"] == "push"]
        self.assertEqual(seqs, list(range(1, 12)))
        self.assertEqual(connection.messages[-1]["data"], "live")

    def test_live_pushes_held_too_long(self):
        """
        Live pushes held behind a replay the client does not read are
        bounded by C{session.max_outbuf}: past it the session is kicked with
        C{slow_consumer}, and the pushes stay in the mailbox.
        """
        session, connection = self.resume(paused_after=2)
        for i in range(3):
            self.stack.push(["alice"], "note", "x" * 1000)
        self.assertEqual(connection.messages[-1]["t"], "kick")
        self.assertEqual(connection.messages[-1]["reason"], "slow_consumer")
        self.assertTrue(connection.closed)
        self.assertEqual(self.successResultOf(
            self.stack.mailboxes.size("alice")), 13)
