"""
End to end: what a broken or hostile client sends to every listener
(PROTOCOL.md sections 1 and 2), and that the gate then still serves a fresh
client. Through real sockets; helpers: L{tests.e2e}.
"""

import json
import struct

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.e2e import (HTTP, assert_healthy, connect_raw, connect_tcp,
                       connect_ws, start_gate, until)


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


class ClosingErrorsMixin:
    """
    Payloads answered with one C{err} (no C{id}) and a closed connection,
    on the transport C{transport}.
    """

    transport = None

    def connect(self, gate):
        return (connect_tcp if self.transport == "tcp" else connect_ws)(
            self, gate)

    async def assert_closed_with(self, gate, payload, code, login=False,
                                 binary=False):
        client = await self.connect(gate)
        if login:
            await client.login("mallory")
        if binary:
            client.send_payload(payload, binary=True)
        else:
            client.send_payload(payload)
        err = await client.next()
        self.assertEqual(err["t"], "err", payload[:80])
        self.assertEqual(err["code"], code, payload[:80])
        self.assertNotIn("id", err)
        self.assertIsInstance(err["msg"], str)
        await client.wait_lost()
        self.assertEqual(client.received[-1:], [err])
        self.assertEqual(len(client.received), 2 if login else 1)

    async def test_bad_json(self):
        gate = start_gate(self)
        payloads = [b"{", b"not json", b'{"t": "ping",}', b"",
                    b'{"t": "ping", "ts": NaN}', b"[" * 20000 + b"]" * 20000]
        for payload in payloads:
            await self.assert_closed_with(gate, payload, "bad_json")
        await assert_healthy(self, gate, self.transport)

    async def test_not_an_object(self):
        gate = start_gate(self)
        for payload in (b"[]", b'[{"t": "ping"}]', b'"ping"', b"5", b"null",
                        b"true"):
            await self.assert_closed_with(gate, payload, "bad_json")
        # Also once bound.
        await self.assert_closed_with(gate, b"[1]", "bad_json", login=True)
        await assert_healthy(self, gate, self.transport)

    async def test_invalid_utf8(self):
        gate = start_gate(self)
        for payload in (b'{"t": "ping", "ts": "\xff\xfe"}', b"\xc3\x28",
                        b"\xed\xa0\x80"):
            await self.assert_closed_with(gate, payload, "bad_json",
                                          **self.binary)
        await assert_healthy(self, gate, self.transport)

    async def test_wrong_field_types(self):
        """
        A field of the wrong kind is C{bad_request}, with the request's
        C{id} when it has a usable one; the connection stays open.
        """
        gate = start_gate(self)
        client = await self.connect(gate)
        cases = [
            ({"id": 1}, 1),
            ({"t": ["login"]}, None),
            ({"t": 5, "id": 2}, 2),
            ({"t": None, "id": 3}, 3),
            ({"t": "login", "data": {"name": "x"}}, None),
            ({"t": "login", "id": "4", "data": {"name": "x"}}, None),
            ({"t": "login", "id": True, "data": {"name": "x"}}, None),
            ({"t": "login", "id": 1.5, "data": {"name": "x"}}, None),
            ({"t": "auth", "id": 5}, 5),
            ({"t": "auth", "id": 6, "token": 5}, 6),
            ({"t": "auth", "id": 7, "token": ""}, 7),
            ({"t": "resume", "id": 8, "player_id": 5, "resume_token": "x",
              "last_seq": 0}, 8),
            ({"t": "resume", "id": 9, "player_id": "a", "resume_token": None,
              "last_seq": 0}, 9),
            ({"t": "resume", "id": 10, "player_id": "a", "resume_token": "x",
              "last_seq": -1}, 10),
            ({"t": "resume", "id": 11, "player_id": "a", "resume_token": "x",
              "last_seq": "0"}, 11),
            ({"t": "resume", "id": 12, "player_id": "a", "resume_token": "x",
              "last_seq": True}, 12),
            ({"t": "resume", "id": 13, "player_id": "a",
              "resume_token": "x"}, 13),
            ({"t": "req", "id": 14, "route": 5}, 14),
            ({"t": "req", "id": 15}, 15),
            ({"t": "req", "id": 16, "route": "../admin"}, 16),
            ({"t": "req", "id": 17, "route": "a b"}, 17),
            ({"t": "req", "id": 18, "route": ""}, 18),
            ({"t": "req", "id": 19, "route": "x" * 300}, 19),
            ({"t": "ack"}, None),
            ({"t": "ack", "seq": "3"}, None),
            ({"t": "ack", "seq": -1}, None),
            ({"t": "ping", "ts": [1]}, None),
            ({"t": "ping", "ts": {"a": 1}}, None),
            ({"t": "ping", "ts": True}, None),
        ]
        for envelope, rid in cases:
            client.send(envelope)
            err = await client.next()
            self.assertEqual((err["t"], err["code"]), ("err", "bad_request"),
                             envelope)
            self.assertEqual(err.get("id"), rid, envelope)
            self.assertIsInstance(err["msg"], str)
        # Still open and still not bound.
        self.assertFalse(client.is_lost)
        answer = await client.request({"t": "req", "route": "echo"})
        self.assertEqual(answer["code"], "not_authenticated")
        await client.login("carol")
        answer = await client.request({"t": "req", "route": "echo",
                                       "data": "ok"})
        self.assertEqual(answer["data"], "ok")
        await assert_healthy(self, gate, self.transport)

    async def test_unknown_types(self):
        gate = start_gate(self)
        client = await self.connect(gate)
        for rid, kind in enumerate(["hello", "resp", "push", "kick", "PING",
                                    "", "x" * 1000], start=1):
            client.send({"t": kind, "id": rid})
            err = await client.next()
            self.assertEqual((err["t"], err["code"], err["id"]),
                             ("err", "unknown_type", rid), kind)
        client.send({"t": "subscribe"})
        err = await client.next()
        self.assertEqual((err["t"], err["code"]), ("err", "unknown_type"))
        self.assertNotIn("id", err)
        self.assertFalse(client.is_lost)
        await client.login("dave")
        await assert_healthy(self, gate, self.transport)

    async def test_before_login(self):
        """
        Requests before login are refused, an ack is ignored, ping works.
        """
        gate = start_gate(self)
        client = await self.connect(gate)
        for rid, route in enumerate(["echo", "whoami", "say", "nope"],
                                    start=1):
            answer = await client.request({"t": "req", "id": rid,
                                           "route": route, "data": {}})
            self.assertEqual((answer["t"], answer["id"], answer["code"]),
                             ("err", rid, "not_authenticated"))
        client.send({"t": "ack", "seq": 5})
        client.send({"t": "ping", "ts": 1})
        self.assertEqual(await client.next(), {"t": "pong", "ts": 1})
        await assert_healthy(self, gate, self.transport)


class TCPBadInputTests(ClosingErrorsMixin, TestCase):
    transport = "tcp"
    binary = {}

    async def test_oversized_header(self):
        gate = start_gate(self)
        for size in (65537, 2 ** 32 - 1):
            client = await connect_tcp(self, gate)
            client.send_raw(struct.pack(">I", size) + b"{}")
            err = await client.next()
            self.assertEqual((err["t"], err["code"]),
                             ("err", "frame_too_large"))
            self.assertNotIn("id", err)
            await client.wait_lost()
        await assert_healthy(self, gate, "tcp")

    async def test_oversized_header_with_more_data(self):
        """
        The C{err} reaches a client that sent more after the oversized
        header: the gate does not reset the connection on its unread bytes.
        """
        gate = start_gate(self)
        for _ in range(3):
            client = await connect_tcp(self, gate)
            client.send_raw(struct.pack(">I", 10 ** 6) + b"z" * 300000)
            err = await client.next()
            self.assertEqual((err["t"], err["code"]),
                             ("err", "frame_too_large"))
            await client.wait_lost()
        await assert_healthy(self, gate, "tcp")

    async def test_max_frame_boundary(self):
        gate = start_gate(self, session={"max_frame": 128})
        client = await connect_tcp(self, gate)
        ping = json.dumps({"t": "ping", "ts": "x"}).encode()
        exact = ping[:-1] + b" " * (128 - len(ping)) + b"}"
        self.assertEqual(len(exact), 128)
        client.send_payload(exact)
        self.assertEqual(await client.next(), {"t": "pong", "ts": "x"})
        client.send_payload(exact[:-1] + b" }")
        err = await client.next()
        self.assertEqual((err["t"], err["code"]), ("err", "frame_too_large"))
        await client.wait_lost()
        await assert_healthy(self, gate, "tcp")

    async def test_truncated_frame_then_close(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        client = await connect_tcp(self, gate)
        await client.login("trudy")
        client.send_raw(struct.pack(">I", 100) + b'{"t": "ping"')
        client.send_raw(b"\x00\x00")  # half of the next header
        await client.close()
        await api.wait_offline("trudy")
        self.assertEqual(client.received[1:], [])
        code, answer, _ = await api.get("/v1/sessions")
        self.assertEqual(answer, {"sessions": []})
        await assert_healthy(self, gate, "tcp")

    async def test_header_only_then_close(self):
        gate = start_gate(self)
        api = HTTP(self, gate)
        for data in (b"\x00", b"\x00\x00\x00", struct.pack(">I", 10)):
            client = await connect_tcp(self, gate)
            client.send_raw(data)
            await client.close()
            self.assertEqual(client.received, [])

        async def no_sessions():
            code, answer, _ = await api.get("/v1/sessions")
            return code == 200 and answer == {"sessions": []}
        await until(no_sessions, "the gate to drop the half-framed sessions")
        await assert_healthy(self, gate, "tcp")

    async def test_frames_split_and_joined(self):
        """
        Frames split at every byte and several frames in one write.
        """
        gate = start_gate(self)
        client = await connect_tcp(self, gate)
        data = b"".join(frame(json.dumps({"t": "ping", "ts": n}).encode())
                        for n in range(3))
        for i in range(len(data)):
            client.send_raw(data[i:i + 1])
        client.send_raw(data)
        pongs = [await client.next() for _ in range(6)]
        self.assertEqual(pongs, [{"t": "pong", "ts": n % 3}
                                 for n in range(6)])

    async def test_garbage_bytes(self):
        """
        Random bytes read as a header announce a huge frame: refused.
        """
        gate = start_gate(self)
        client = await connect_tcp(self, gate)
        client.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        err = await client.next()
        self.assertEqual(err["code"], "frame_too_large")
        await client.wait_lost()
        await assert_healthy(self, gate, "tcp")


class WebSocketBadInputTests(ClosingErrorsMixin, TestCase):
    transport = "ws"
    # Invalid UTF-8 in a text message is refused by WebSocket itself; in a
    # binary message it reaches the gate's JSON check.
    binary = {"binary": True}

    async def test_binary_message_is_a_payload(self):
        gate = start_gate(self)
        client = await connect_ws(self, gate)
        client.send_payload(json.dumps({"t": "ping", "ts": 3}).encode(),
                            binary=True)
        self.assertEqual(await client.next(), {"t": "pong", "ts": 3})

    async def test_invalid_utf8_text_message(self):
        gate = start_gate(self)
        client = await connect_ws(self, gate)
        client.send_payload(b'{"t": "ping", "ts": "\xff"}')
        await client.wait_lost()
        self.assertEqual([e for e in client.received if e["t"] != "err"], [])
        await assert_healthy(self, gate, "ws")

    async def test_oversized_message(self):
        gate = start_gate(self, session={"max_frame": 1024})
        client = await connect_ws(self, gate)
        await client.login("mallory")
        ok = json.dumps({"t": "ping", "ts": "x" * 900}).encode()
        client.send_payload(ok)
        self.assertEqual((await client.next())["t"], "pong")
        client.send_payload(json.dumps({"t": "ping",
                                        "ts": "x" * 2000}).encode())
        err = await client.next()
        self.assertEqual((err["t"], err["code"]), ("err", "frame_too_large"))
        self.assertNotIn("id", err)
        await client.wait_lost()
        await assert_healthy(self, gate, "ws")

    async def test_oversized_fragmented_message(self):
        """
        Fragments each under the limit, together over it.
        """
        gate = start_gate(self, session={"max_frame": 1024})
        client = await connect_ws(self, gate)
        client.beginMessage(isBinary=False)
        for _ in range(3):
            client.sendMessageFrame(b" " * 500)
        client.endMessage()
        err = await client.next()
        self.assertEqual((err["t"], err["code"]), ("err", "frame_too_large"))
        await client.wait_lost()
        await assert_healthy(self, gate, "ws")

    async def test_garbage_before_handshake(self):
        gate = start_gate(self)
        cases = [(b"\x00\xff\x13\x37" * 64 + b"\r\n\r\n", b"HTTP/1.1 400 "),
                 (b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 400 "),
                 # A plain GET: no upgrade.
                 (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", None)]
        for garbage, answer in cases:
            raw = await connect_raw(self, gate, "ws")
            raw.transport.write(garbage)
            await raw.wait_lost()
            self.assertFalse(raw.data.startswith(b"HTTP/1.1 101"), raw.data)
            if answer is not None:
                self.assertTrue(raw.data.startswith(answer), raw.data[:100])
        await assert_healthy(self, gate, "ws")

    async def test_garbage_after_handshake(self):
        gate = start_gate(self)
        client = await connect_ws(self, gate)
        await client.login("mallory")
        # Not a WebSocket frame: reserved bits and opcode set, unmasked.
        client.transport.write(b"\xff\xff\xff\xff\xff\xff\xff\xff" * 8)
        await client.wait_lost()
        self.assertEqual([e["t"] for e in client.received], ["resp"])
        await assert_healthy(self, gate, "ws")

    async def test_other_path_refused(self):
        gate = start_gate(self)
        for path in ("/", "/other", "/ws/x", "/WS"):
            with self.assertRaises(ConnectionError):
                await connect_ws(self, gate, path)
        code, answer, _ = await HTTP(self, gate).get("/v1/sessions")
        self.assertEqual(answer, {"sessions": []})
        await assert_healthy(self, gate, "ws")


class HTTPListenerBadInputTests(TestCase):
    async def garbage_to(self, listener):
        gate = start_gate(self)
        bad_request = b"HTTP/1.1 400 Bad Request\r\n\r\n"
        cases = [
            (b"\x00\xff\x13\x37" * 64 + b"\r\n\r\n", bad_request),
            (b"GET / HTTP/9.9 junk\r\n\r\n", bad_request),
            (b"POST /v1/push HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
             bad_request),
            # A header line over twisted.web's limit: closed unanswered.
            (b"GET /health HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
             b""),
        ]
        for garbage, answer in cases:
            raw = await connect_raw(self, gate, listener)
            raw.transport.write(garbage)
            await raw.wait_lost()
            self.assertEqual(raw.data, answer, garbage[:40])
        await assert_healthy(self, gate, "tcp")
        api = HTTP(self, gate)
        self.assertEqual(await api.push([], "r", None),
                         {"delivered": 0, "queued": 0, "dropped": 0,
                          "unknown": []})

    def test_garbage_to_api(self):
        return self.garbage_to("api")

    def test_garbage_to_metrics(self):
        return self.garbage_to("metrics")


class HandshakeLimitTests(TestCase):
    async def test_endless_websocket_handshake(self):
        """
        An opening handshake whose headers never end is cut off once it is
        over 16 KiB, not buffered for as long as the client keeps sending.
        """
        from tests.e2e import connect_raw
        gate = start_gate(self)
        raw = await connect_raw(self, gate, "ws")
        raw.transport.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        for _ in range(40):
            if raw.is_lost:
                break
            raw.transport.write(b"a" * 1024)
            await deferLater(reactor, 0.01, lambda: None)
        await raw.wait_lost()
        self.assertEqual(raw.data, b"")
        await assert_healthy(self, gate, "ws")
