"""
End-to-end tests of the encrypted channel (PROTOCOL.md section 8) on a
real gate's C{listen.tcp_secure} over 127.0.0.1: the Python client logs
in, echoes and receives persistent pushes across many key rotations both
ways and a resume; a wrong pinned key, a garbage first frame, a silent
connection and a replayed frame each end the connection without a word;
a client that stops reading is kicked slow_consumer, sealed, last.
"""

import json
import os
import socket

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import TestCase

from gate.channel import ClientHandshake
from gate.client import GateClient, GateError
from gate.framing import FrameDecoder, frame
from gate.keys import public_key_b64
from tests.e2e import (HTTP, LOOPBACK, TIMEOUT, RawClient, connect_raw,
                       start_gate, until, within)


class ReasonClient(RawClient):
    """
    A L{RawClient} that keeps why its connection ended.
    """

    reason = None

    def connectionLost(self, reason):
        self.reason = reason
        RawClient.connectionLost(self, reason)


class EncryptedChannelTests(TestCase):
    def gate(self, **encrypt):
        self.key_file = os.path.join(self.mktemp() + "-keys", "gate.pem")
        os.makedirs(os.path.dirname(self.key_file))
        encrypt["key_file"] = self.key_file
        session = encrypt.pop("session", {})
        player = encrypt.pop("player", {})
        return start_gate(self, listen={"tcp_secure": LOOPBACK},
                          encrypt=encrypt, session=session, player=player)

    def addr(self, gate):
        host, port = gate.address("tcp_secure")
        return f"tcp+enc://{host}:{port}"

    async def client(self, gate, name="alice", **kw):
        pushes, states = [], []
        kw.setdefault("gate_key", public_key_b64(gate.channel_key))
        client = GateClient(reactor, self.addr(gate), login={"name": name},
                            on_push=pushes.append,
                            on_state=lambda state, info: states.append(state),
                            max_backoff=0.5, **kw)
        self.addCleanup(lambda: within(client.close(), TIMEOUT,
                                       "the client to close"))
        await within(client.connect(), TIMEOUT, f"{name} to log in")
        return client, pushes, states

    async def test_session_across_rekeys_and_resume(self):
        """
        With the gate rotating every 3 frames and the client every 2, a
        logged-in client echoes and receives every persistent push once, in
        order, also those queued while its connection was down.
        """
        gate = self.gate(rekey_frames=3)
        self.assertEqual(os.stat(self.key_file).st_mode & 0o777, 0o600)
        api = HTTP(self, gate)
        client, pushes, states = await self.client(gate, rekey_frames=2)
        for n in range(5):
            self.assertEqual(await client.request("echo", {"n": n}),
                             {"n": n})
        for n in range(1, 21):
            await api.push(["alice"], "n", n)
        await until(lambda: len(pushes) == 20, "20 pushes")
        session = gate.players.get("alice").session
        channel = session.connection.channel
        self.assertEqual(session.transport_name, "tcp+enc")
        sent, received = channel.rotations
        self.assertGreaterEqual(sent, (1 + 5 + 20) // 4)
        self.assertGreaterEqual(received, 2)  # login + 5 echoes + acks
        code, listing, _ = await api.get("/v1/sessions")
        self.assertEqual([s["transport"] for s in listing["sessions"]],
                         ["tcp+enc"])
        self.assertIn(self.addr(gate), gate.describe()[1])

        session.connection.abort()
        await until(lambda: gate.players.get("alice").session is None,
                    "the gate to see the drop")
        for n in range(21, 31):
            answer = await api.push(["alice"], "n", n)
            self.assertEqual(answer["queued"], 1)
        await until(lambda: len(pushes) == 30, "the queued pushes")
        for n in range(31, 41):
            await api.push(["alice"], "n", n)
        await until(lambda: len(pushes) == 40, "live pushes after resume")
        self.assertEqual([(p.seq, p.data) for p in pushes],
                         [(n, n) for n in range(1, 41)])
        self.assertIn("resumed", states)
        self.assertGreaterEqual(
            gate.players.get("alice").session.connection.channel.rotations[0],
            5)

    async def test_rekey_by_time(self):
        gate = self.gate(rekey_seconds=0.05)
        client, _, _ = await self.client(gate)
        session = gate.players.get("alice").session

        async def rotated_twice():
            await client.request("echo", 1)
            return session.connection.channel.rotations[0] >= 2

        await until(rotated_twice, "two timed rotations")

    async def test_pinned_wrong_key(self):
        """
        A client pinning another key hangs up after the gate's hello,
        before sending anything under the channel: the gate sees no login.
        """
        gate = self.gate()
        other = self.gate()
        client = GateClient(reactor, self.addr(gate), login={"name": "bob"},
                            gate_key=public_key_b64(other.channel_key),
                            reconnect=False)
        error = await within(self.assertFailure(client.connect(), GateError),
                             TIMEOUT, "the connect to fail")
        self.assertEqual(error.code, "connect_failed")
        self.assertIn("pinned", error.msg)
        await until(lambda: not gate.sessions.sessions,
                    "the gate to see the hang-up")
        self.assertIsNone(gate.players.get("bob"))

    async def test_garbage_first_frame(self):
        gate = self.gate()
        for garbage in (frame(b"garbage"), b"GET / HTTP/1.1\r\n\r\n",
                        frame(b'{"t":"login","id":1,"data":{}}')):
            raw = await connect_raw(self, gate, "tcp_secure")
            raw.transport.write(garbage)
            await raw.wait_lost()
            self.assertEqual(raw.data, b"")
        self.assertEqual(gate.sessions.sessions, {})
        self.assertEqual(self.bad_input(gate, "channel_hello"), 3)

    @staticmethod
    def bad_input(gate, code):
        return gate.metrics.registry.get_sample_value(
            "mmogate_bad_input_total", {"code": code})

    async def test_silent_connection_closed(self):
        gate = self.gate(session={"login_timeout": 0.2})
        raw = await connect_raw(self, gate, "tcp_secure")
        await raw.wait_lost()
        self.assertEqual(raw.data, b"")
        self.assertEqual(self.bad_input(gate, "channel_timeout"), 1)

    async def handshake(self, gate):
        """
        A raw connection with its handshake done:
        C{(raw client, channel, decoder)}.
        """
        raw = await connect_raw(self, gate, "tcp_secure")
        hs = ClientHandshake(gate.channel_key.public_key().public_bytes_raw())
        raw.transport.write(frame(hs.hello()))
        decoder = FrameDecoder(1 << 20)
        await until(lambda: raw.data, "the gate's hello")
        await until(lambda: len(raw.data) >= 4 + int.from_bytes(
            raw.data[:4], "big"), "the whole hello")
        (reply,) = decoder.feed(raw.data)
        raw.data = b""
        return raw, hs.receive(reply), decoder

    async def test_replayed_frame_ends_connection(self):
        gate = self.gate()
        raw, channel, decoder = await self.handshake(gate)
        ping = channel.seal_framed(b'{"t":"ping","ts":1}')
        raw.transport.write(ping)
        await until(lambda: raw.data, "the pong")
        (pong,) = decoder.feed(raw.data)
        self.assertEqual(json.loads(channel.open(pong)),
                         {"t": "pong", "ts": 1})
        raw.data = b""
        raw.transport.write(ping)
        await raw.wait_lost()
        self.assertEqual(raw.data, b"")
        self.assertEqual(self.bad_input(gate, "channel_frame"), 1)

    async def test_shutdown_kick_is_sealed(self):
        gate = self.gate()
        raw, channel, decoder = await self.handshake(gate)
        await within(gate.stopService(), TIMEOUT, "the gate to stop")
        await raw.wait_lost()
        (kick,) = [json.loads(channel.open(p)) for p in decoder.feed(raw.data)]
        self.assertEqual((kick["t"], kick["reason"]), ("kick", "shutdown"))

    async def test_slow_consumer_kicked_sealed_then_closed(self):
        """
        A client over the channel that stops reading while persistent
        pushes flow (the gate rotating before every frame) is kicked
        C{slow_consumer}: once it reads again, every frame opens in order,
        the sealed kick is the last of them, and the gate closes cleanly
        (FIN, not reset).
        """
        gate = self.gate(rekey_frames=1, session={"max_outbuf": 16384},
                         player={"mailbox_max": 100000})
        host, port = gate.address("tcp_secure")
        raw = await within(connectProtocol(
            TCP4ClientEndpoint(reactor, host, port, timeout=TIMEOUT),
            ReasonClient()), TIMEOUT, "a connection to tcp_secure")
        self.addCleanup(raw.close)
        hs = ClientHandshake(gate.channel_key.public_key().public_bytes_raw())
        raw.transport.write(frame(hs.hello()))
        decoder = FrameDecoder(1 << 20)
        await until(lambda: len(raw.data) >= 4 and len(raw.data) >= 4 +
                    int.from_bytes(raw.data[:4], "big"), "the gate's hello")
        (reply,) = decoder.feed(raw.data)
        raw.data = b""
        channel = hs.receive(reply)
        raw.transport.write(channel.seal_framed(
            b'{"t":"login","id":1,"data":{"name":"alice"}}'))
        await until(lambda: gate.players.get("alice") is not None
                    and gate.players.get("alice").session is not None,
                    "alice to log in")
        session = gate.players.get("alice").session
        session.connection.transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        raw.transport.getHandle().setsockopt(socket.SOL_SOCKET,
                                             socket.SO_RCVBUF, 4096)
        raw.transport.pauseProducing()
        api = HTTP(self, gate)
        body = {"players": ["alice"], "route": "blob", "data": "x" * 1024}
        accepted = 0
        while not session.closing:
            self.assertLess(accepted, 100000, "never kicked")
            code, answer, text = await api.post("/v1/batch",
                                                {"ops": [body] * 50})
            self.assertEqual(code, 200, text)
            accepted += sum(r["delivered"] + r["queued"]
                            for r in answer["results"])
        raw.transport.resumeProducing()
        await raw.wait_lost()
        self.assertIsInstance(raw.reason.value, ConnectionDone)
        envelopes, rekeys = [], 0
        frames = decoder.feed(raw.data)
        # Nothing but whole frames: no partial one after the kick.
        self.assertEqual(sum(4 + len(f) for f in frames), len(raw.data))
        for sealed in frames:
            plain = channel.open(sealed)
            if plain is None:
                rekeys += 1
            else:
                envelopes.append(json.loads(plain))
        self.assertEqual(envelopes[0]["t"], "resp")
        pushes = envelopes[1:-1]
        self.assertEqual([p["seq"] for p in pushes],
                         list(range(1, len(pushes) + 1)))
        self.assertEqual((envelopes[-1]["t"], envelopes[-1]["reason"]),
                         ("kick", "slow_consumer"))
        self.assertGreaterEqual(rekeys, len(pushes))
        self.assertEqual(gate.metrics.registry.get_sample_value(
            "mmogate_kicks_total", {"reason": "slow_consumer"}), 1)
        self.assertIsNone(self.bad_input(gate, "channel_frame"))
