"""
End-to-end tests of the gate's limits over real sockets on 127.0.0.1:
connections refused over C{limits.max_per_ip} / C{limits.max_connections}
(TCP and WebSocket), the login timeout, the request rate, JSON nesting
depth, the memory one client that never reads can cost, and the kick that
bans and revokes.
"""

import socket

from twisted.trial.unittest import TestCase

from tests.e2e import (HTTP, assert_healthy, auth_token, connect_raw,
                       connect_tcp, connect_ws, start_gate, until)

WS_HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n")


def refused(gate, reason):
    return gate.metrics.registry.get_sample_value(
        "mmogate_connections_refused_total", {"reason": reason}) or 0


def limited(gate, reason):
    return gate.metrics.registry.get_sample_value(
        "mmogate_sessions_limited_total", {"reason": reason}) or 0


class ConnectionLimitTests(TestCase):
    async def assert_tcp_refused(self, gate):
        client = await connect_tcp(self, gate)
        message = await client.next()
        self.assertEqual((message["t"], message["code"]), ("err", "busy"))
        client.send({"t": "login", "id": 1, "data": {"name": "x"}})
        await client.wait_lost()
        client.assert_nothing_pending()

    async def assert_ws_refused(self, gate):
        raw = await connect_raw(self, gate, "ws")
        raw.transport.write(WS_HANDSHAKE)
        await raw.wait_lost()
        self.assertTrue(raw.data.startswith(b"HTTP/1.1 503 "), raw.data)

    async def test_max_per_ip(self):
        """
        Past C{limits.max_per_ip} connections from one address (over both
        client listeners) a TCP client gets C{err} C{busy} and a WebSocket
        client HTTP 503; once one goes, another is let in.
        """
        gate = start_gate(self, limits={"max_per_ip": 2})
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        bob = await connect_ws(self, gate)
        await bob.login("bob")
        await self.assert_tcp_refused(gate)
        await self.assert_ws_refused(gate)
        self.assertEqual(refused(gate, "max_per_ip"), 2)
        self.assertEqual(len(gate.sessions.sessions), 2)
        await alice.close()
        await until(lambda: gate.sessions.limits.open == 1,
                    "the gate to count alice's connection gone")
        carol = await connect_tcp(self, gate)
        await carol.login("carol")
        await bob.close()
        await carol.close()
        await until(lambda: gate.sessions.limits.open == 0,
                    "every connection released")

    async def test_max_connections(self):
        gate = start_gate(self, limits={"max_connections": 1})
        alice = await connect_ws(self, gate)
        await alice.login("alice")
        await self.assert_ws_refused(gate)
        await self.assert_tcp_refused(gate)
        self.assertEqual(refused(gate, "max_connections"), 2)
        await alice.close()
        await until(lambda: gate.sessions.limits.open == 0,
                    "alice's connection released")
        await assert_healthy(self, gate, "ws")

    async def test_refused_client_that_sends_nothing(self):
        """
        A refused TCP client that sends nothing still gets its C{err} and
        is closed (after L{gate.limits.REFUSE_TIMEOUT}).
        """
        gate = start_gate(self, limits={"max_connections": 1})
        alice = await connect_tcp(self, gate)
        await alice.login("alice")
        idle = await connect_tcp(self, gate)
        self.assertEqual((await idle.next())["code"], "busy")
        await idle.wait_lost()
        self.assertEqual(gate.sessions.limits.refusing, 0)


class LoginTimeoutTests(TestCase):
    async def test_closed_without_login(self):
        """
        A connection that does not log in within C{session.login_timeout}
        gets C{err} C{not_authenticated} and is closed, pings or not.
        """
        gate = start_gate(self, session={"login_timeout": 0.5})
        lazy = await connect_tcp(self, gate)
        lazy.send({"t": "ping", "ts": 1})
        message = await lazy.expect(lambda e: e["t"] == "err")
        self.assertEqual(message["code"], "not_authenticated")
        self.assertNotIn("id", message)
        await lazy.wait_lost()
        self.assertEqual(limited(gate, "login_timeout"), 1)


class RateTests(TestCase):
    async def test_rate_limited_then_closed(self):
        """
        A client that sends far over C{session.rate} gets C{rate_limited}
        for each envelope over it and is closed after
        C{session.rate_strikes} of them in a row.
        """
        gate = start_gate(self, session={"rate": 0.01, "burst": 5,
                                         "rate_strikes": 10})
        client = await connect_tcp(self, gate)
        await client.login("mallory")
        # Four left in the burst after the login.
        for rid in range(1, 5):
            answer = await client.request({"t": "req", "id": rid,
                                           "route": "echo", "data": rid})
            self.assertEqual(answer["t"], "resp", answer)
        for rid in range(100, 120):
            client.send({"t": "req", "id": rid, "route": "echo", "data": rid})
        await client.wait_lost()
        errs = [e for e in client.received if e["t"] == "err"]
        # Ten strikes: nine answered, the tenth closes.
        self.assertEqual([(e.get("id"), e["code"]) for e in errs],
                         [(rid, "rate_limited") for rid in range(100, 109)]
                         + [(None, "rate_limited")])
        self.assertEqual(limited(gate, "rate_limited"), 1)
        await assert_healthy(self, gate)


class DepthTests(TestCase):
    async def test_deep_envelope_is_bad_json(self):
        gate = start_gate(self, session={"max_depth": 8})
        client = await connect_ws(self, gate)
        await client.login("alice")
        ok = await client.request({"t": "req", "route": "echo",
                                   "data": [[[[[[1]]]]]]})
        self.assertEqual(ok["data"], [[[[[[1]]]]]])
        client.send_payload(b'{"t": "req", "id": 9, "route": "echo", '
                            b'"data": ' + b"[" * 8 + b"]" * 8 + b"}")
        message = await client.next()
        self.assertEqual((message["t"], message["code"]), ("err", "bad_json"))
        await client.wait_lost()
        hostile = await connect_tcp(self, gate)
        hostile.send_payload(b"[" * 60000)
        self.assertEqual((await hostile.next())["code"], "bad_json")
        await hostile.wait_lost()
        await assert_healthy(self, gate)


MAX_OUTBUF = 16384


class SlowConsumerMemoryTests(TestCase):
    async def test_never_reading_client_costs_bounded_memory(self):
        """
        A client logs in and never reads while thousands of persistent
        pushes flow to it. Measured at every write the gate makes to it,
        what waits for it in the gate (counted by its L{OutputFlow}, and
        the transport's own buffer) never goes past C{session.max_outbuf}
        plus one message beyond one transport buffer; it is kicked
        C{slow_consumer}; and a client resuming from seq 0 gets every push
        the API answered C{delivered} or C{queued}, once each, in order.
        """
        gate = start_gate(self, session={"max_outbuf": MAX_OUTBUF},
                          player={"mailbox_max": 100000})
        api = HTTP(self, gate)
        alice = await connect_tcp(self, gate)
        login = await alice.login("alice")
        session = next(s for s in gate.sessions.sessions.values()
                       if s.player_id == "alice")
        connection = session.connection
        flow = connection._flow
        transport = connection.transport
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                         8192)
        alice.transport.getHandle().setsockopt(socket.SOL_SOCKET,
                                               socket.SO_RCVBUF, 4096)
        alice.transport.pauseProducing()
        peaks = {"queued": 0, "buffered": 0, "held": 0, "message": 0}
        send = connection.send

        def measured(outgoing):
            send(outgoing)
            peaks["queued"] = max(peaks["queued"], flow.queued)
            peaks["buffered"] = max(peaks["buffered"], buffered(transport))
            peaks["held"] = max(peaks["held"], session._held_bytes)
            peaks["message"] = max(peaks["message"], len(outgoing.framed))

        connection.send = measured
        body = {"players": ["alice"], "route": "blob", "data": "x" * 1024}
        accepted = 0
        queued = 0
        while accepted < 3000 or not queued:
            self.assertLess(accepted, 100000, "never kicked")
            code, answer, raw = await api.post("/v1/batch",
                                               {"ops": [body] * 50})
            self.assertEqual(code, 200, raw)
            for result in answer["results"]:
                self.assertEqual(result["dropped"] + len(result["unknown"]),
                                 0, result)
                accepted += result["delivered"] + result["queued"]
                queued += result["queued"]
        self.assertTrue(session.closing)
        self.assertEqual(gate.metrics.registry.get_sample_value(
            "mmogate_kicks_total", {"reason": "slow_consumer"}), 1)
        one = peaks["message"]
        self.assertLessEqual(peaks["queued"], MAX_OUTBUF + one)
        # Twisted's buffer takes writes up to its 64 KiB before it pauses
        # the flow; from then on they are what the flow counts.
        self.assertLessEqual(peaks["buffered"],
                             transport.bufferSize + one + MAX_OUTBUF + one)
        self.assertEqual(peaks["held"], 0)
        await alice.abort()

        again = await connect_tcp(self, gate)
        resp = await again.request({"t": "resume", "player_id": "alice",
                                    "resume_token": login["resume_token"],
                                    "last_seq": 0})
        self.assertEqual(resp["t"], "resp", resp)
        self.assertEqual(resp["last_seq"], accepted)
        seqs = []
        while len(seqs) < accepted:
            env = await again.next()
            self.assertEqual(env["t"], "push", env)
            seqs.append(env["seq"])
        self.assertEqual(seqs, list(range(1, accepted + 1)))
        again.send({"t": "ping", "ts": "end"})
        self.assertEqual(await again.next(), {"t": "pong", "ts": "end"})
        again.assert_nothing_pending()


def buffered(transport):
    """
    Bytes the gate's transport holds in its own write buffer.
    """
    return (len(transport.dataBuffer) - transport.offset
            + transport._tempDataLen)


class KickBanTests(TestCase):
    async def test_kick_with_ban(self):
        """
        C{POST /v1/kick} with C{ban_seconds}: the player is kicked, login,
        auth and resume answer C{auth_failed} while the ban lasts, and the
        resume tokens it had stay useless after it.
        """
        gate = start_gate(self)
        api = HTTP(self, gate)
        alice = await connect_tcp(self, gate)
        login = await alice.login("alice")
        code, answer, _ = await api.post("/v1/kick", {
            "player_id": "alice", "reason": "cheating", "ban_seconds": 0.5})
        self.assertEqual((code, answer), (200, {"kicked": True}))
        kick = await alice.next()
        self.assertEqual((kick["t"], kick["reason"], kick["msg"]),
                         ("kick", "admin", "cheating"))
        await alice.wait_lost()

        again = await connect_ws(self, gate)
        answer = await again.request({"t": "login",
                                      "data": {"name": "alice"}})
        self.assertEqual(answer["code"], "auth_failed", answer)
        answer = await again.request({"t": "auth",
                                      "token": auth_token("alice")})
        self.assertEqual(answer["code"], "auth_failed", answer)
        answer = await again.request({"t": "resume", "player_id": "alice",
                                      "resume_token": login["resume_token"],
                                      "last_seq": 0})
        self.assertEqual(answer["code"], "auth_failed", answer)

        await until(lambda: not gate.players.bans.banned("alice"),
                    "the ban to end")
        answer = await again.request({"t": "resume", "player_id": "alice",
                                      "resume_token": login["resume_token"],
                                      "last_seq": 0})
        self.assertEqual(answer["code"], "resume_rejected", answer)
        fresh = await again.login("alice")
        await again.abort()
        third = await connect_tcp(self, gate)
        await HTTP(self, gate).wait_offline("alice")
        answer = await third.request({"t": "resume", "player_id": "alice",
                                      "resume_token": fresh["resume_token"],
                                      "last_seq": 0})
        self.assertEqual(answer["t"], "resp", answer)

    async def test_ban_of_offline_player(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        code, answer, _ = await api.post("/v1/kick", {"player_id": "nobody",
                                                      "ban_seconds": 60})
        self.assertEqual((code, answer), (200, {"kicked": False}))
        client = await connect_tcp(self, gate)
        answer = await client.request({"t": "login",
                                       "data": {"name": "nobody"}})
        self.assertEqual(answer["code"], "auth_failed")
        code, answer, _ = await api.post("/v1/kick", {"player_id": "nobody",
                                                      "ban_seconds": "1"})
        self.assertEqual((code, answer["error"]["code"]),
                         (400, "bad_request"))
