"""
End-to-end tests of the encrypted channel (PROTOCOL.md section 8) on a
real gate's C{listen.tcp_secure} over 127.0.0.1: the Python client logs
in, echoes and receives persistent pushes across many key rotations both
ways and a resume; a wrong pinned key, a garbage first frame, a silent
connection and a replayed frame each end the connection without a word.
"""

import json
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from gate.channel import ClientHandshake
from gate.client import GateClient, GateError
from gate.framing import FrameDecoder, frame
from gate.keys import public_key_b64
from tests.e2e import (HTTP, LOOPBACK, TIMEOUT, connect_raw, start_gate,
                       until, within)


class EncryptedChannelTests(TestCase):
    def gate(self, **encrypt):
        self.key_file = os.path.join(self.mktemp() + "-keys", "gate.pem")
        os.makedirs(os.path.dirname(self.key_file))
        encrypt["key_file"] = self.key_file
        session = encrypt.pop("session", {})
        return start_gate(self, listen={"tcp_secure": LOOPBACK},
                          encrypt=encrypt, session=session)

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
