"""
Tests for the encrypted channel (PROTOCOL.md section 8): L{gate.channel}
byte for byte (the test vector of docs/encryption.md, recomputed from its
fixed inputs both with the gate's code and independently), the gate's
listener L{gate.secure_tcp} over in-memory transports on a C{task.Clock},
the key file (L{gate.keys}), and the Python client's side
(L{gate.client.secure}).
"""

import base64
import hashlib
import hmac
import io
import json
import os
import re
import stat
import struct
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey, Ed25519PublicKey)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey, X25519PublicKey)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gate.limits import Hangup
from gate import errors
from gate.channel import (OVERHEAD, ChannelError, ClientHandshake,
                          GateHandshake, SecureChannel, client_hello,
                          handshake_keys, parse_client_hello,
                          parse_gate_hello, raw_public, signed_data)
from gate.client import GateClient
from gate.client.cli import parse_args
from gate.client.protocol import IPayloadSender
from gate.client.secure import SecureFramedFactory, parse_gate_key
from gate.framing import FrameDecoder, frame
from gate.interfaces import IClientConnection
from gate.keys import KeyFileError, load_or_create, public_key_b64
from gate.secure_tcp import GateSecureTCPFactory
from gate.session import CHEAP_COST
from tests.fakes import Stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "encryption.md")


def read_vector():
    """
    The C{name: value} lines of the C{vector} block of docs/encryption.md.
    """
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"```vector\n(.*?)```", text, re.S)
    if match is None:
        raise AssertionError("docs/encryption.md has no ```vector block")
    vector = {}
    for line in match.group(1).splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            vector[name.strip()] = value.strip()
    return vector


def hkdf_sha256(ikm, salt, info, length):
    """
    RFC 5869 written out with hmac, as a client in another language would:
    independent of the C{cryptography} HKDF the gate uses.
    """
    prk = hmac.new(salt or b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm, block, n = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([n]),
                         hashlib.sha256).digest()
        okm += block
        n += 1
    return okm[:length]


def seal_frame(key, counter, envelope):
    c = struct.pack(">Q", counter)
    sealed = c + AESGCM(key).encrypt(b"\x00" * 4 + c, envelope, None)
    return struct.pack(">I", len(sealed)) + sealed


class VectorTests(SynchronousTestCase):
    """
    The test vector in docs/encryption.md is what the code computes, and
    what the section 8 recipe computes.
    """

    def setUp(self):
        self.v = read_vector()
        self.h = {k: bytes.fromhex(v) for k, v in self.v.items()
                  if re.fullmatch(r"[0-9a-f]+", v)}

    def fixed(self):
        h = self.h
        x25519 = X25519PrivateKey.from_private_bytes
        return (x25519(h["client_x25519_private"]),
                x25519(h["gate_x25519_private"]),
                Ed25519PrivateKey.from_private_bytes(h["gate_ed25519_seed"]))

    def test_complete(self):
        """
        The vector has every value a client author needs.
        """
        self.assertEqual(set(self.v), {
            "client_x25519_private", "gate_x25519_private",
            "gate_ed25519_seed", "client_x25519_public",
            "gate_x25519_public", "gate_ed25519_public", "shared_secret",
            "client_hello", "signature", "gate_hello", "key_client_to_gate",
            "key_gate_to_client", "envelope_client_to_gate_0",
            "frame_client_to_gate_0", "frame_gate_to_client_rekey_0",
            "key_gate_to_client_after_rekey",
            "envelope_gate_to_client_after_rekey_0",
            "frame_gate_to_client_after_rekey_0"})

    def test_independent(self):
        """
        The section 8 recipe, from primitives only, gives the vector.
        """
        v, h = self.v, self.h
        client, gate, signer = self.fixed()
        x, g = raw_public(client), raw_public(gate)
        self.assertEqual(x, h["client_x25519_public"])
        self.assertEqual(g, h["gate_x25519_public"])
        self.assertEqual(raw_public(signer), h["gate_ed25519_public"])
        shared = client.exchange(X25519PublicKey.from_public_bytes(g))
        self.assertEqual(shared, h["shared_secret"])
        self.assertEqual(gate.exchange(X25519PublicKey.from_public_bytes(x)),
                         shared)
        sig = signer.sign(b"mmogate-v1" + x + g)
        self.assertEqual(sig, h["signature"])
        okm = hkdf_sha256(shared, x + g, b"mmogate-v1", 64)
        self.assertEqual(okm[:32], h["key_client_to_gate"])
        self.assertEqual(okm[32:], h["key_gate_to_client"])
        self.assertEqual(
            json.loads(v["client_hello"]),
            {"t": "hello", "v": 1, "pub": base64.b64encode(x).decode()})
        self.assertEqual(
            json.loads(v["gate_hello"]),
            {"t": "hello", "v": 1, "pub": base64.b64encode(g).decode(),
             "key": base64.b64encode(raw_public(signer)).decode(),
             "sig": base64.b64encode(sig).decode()})
        self.assertEqual(
            seal_frame(okm[:32], 0, v["envelope_client_to_gate_0"].encode()),
            h["frame_client_to_gate_0"])
        self.assertEqual(seal_frame(okm[32:], 0, b'{"t":"rekey"}'),
                         h["frame_gate_to_client_rekey_0"])
        rotated = hkdf_sha256(okm[32:], b"", b"mmogate-v1 rekey", 32)
        self.assertEqual(rotated, h["key_gate_to_client_after_rekey"])
        self.assertEqual(
            seal_frame(rotated, 0,
                       v["envelope_gate_to_client_after_rekey_0"].encode()),
            h["frame_gate_to_client_after_rekey_0"])

    def test_gate_code(self):
        """
        L{gate.channel} produces exactly the vector's bytes, and each side
        opens what the other sealed.
        """
        v, h = self.v, self.h
        client, gate, signer = self.fixed()
        hs = ClientHandshake(raw_public(signer), client)
        self.assertEqual(hs.hello(), v["client_hello"].encode())
        reply, gate_channel = GateHandshake(signer, gate).receive(hs.hello())
        self.assertEqual(reply, v["gate_hello"].encode())
        client_channel = hs.receive(reply)
        self.assertEqual(client_channel.keys, (h["key_client_to_gate"],
                                               h["key_gate_to_client"]))
        self.assertEqual(gate_channel.keys, (h["key_gate_to_client"],
                                             h["key_client_to_gate"]))
        envelope = v["envelope_client_to_gate_0"].encode()
        wire = client_channel.seal_framed(envelope)
        self.assertEqual(wire, h["frame_client_to_gate_0"])
        self.assertEqual(gate_channel.open(wire[4:]), envelope)
        rekey = gate_channel.rekey_framed()
        self.assertEqual(rekey, h["frame_gate_to_client_rekey_0"])
        self.assertEqual(gate_channel.keys[0],
                         h["key_gate_to_client_after_rekey"])
        after = v["envelope_gate_to_client_after_rekey_0"].encode()
        wire = gate_channel.seal_framed(after)
        self.assertEqual(wire, h["frame_gate_to_client_after_rekey_0"])
        self.assertIsNone(client_channel.open(rekey[4:]))
        self.assertEqual(client_channel.open(wire[4:]), after)
        self.assertEqual(client_channel.rotations, (0, 1))

    def test_unframed_seal(self):
        """
        L{SecureChannel.seal} is L{SecureChannel.seal_framed} without the
        length header.
        """
        h = self.h
        channel = SecureChannel(h["key_client_to_gate"],
                                h["key_gate_to_client"])
        self.assertEqual(
            channel.seal(self.v["envelope_client_to_gate_0"].encode()),
            h["frame_client_to_gate_0"][4:])


def pair(rekey_key=None):
    """
    A connected C{(client channel, gate channel)}.
    """
    signer = Ed25519PrivateKey.generate()
    hs = ClientHandshake(raw_public(signer))
    reply, gate = GateHandshake(signer).receive(hs.hello())
    return hs.receive(reply), gate


class ChannelTests(SynchronousTestCase):
    """
    Strict counters and rotation, without any connection.
    """

    def test_both_directions(self):
        client, gate = pair()
        for n in range(5):
            self.assertEqual(gate.open(client.seal(b"up %d" % n)),
                             b"up %d" % n)
            self.assertEqual(client.open(gate.seal(b"down %d" % n)),
                             b"down %d" % n)
        self.assertEqual((client.send_counter, gate.recv_counter), (5, 5))

    def assertRefused(self, channel, sealed):
        self.assertRaises(ChannelError, channel.open, sealed)

    def test_replay(self):
        client, gate = pair()
        first = client.seal(b"a")
        gate.open(first)
        self.assertRefused(gate, first)

    def test_reorder(self):
        client, gate = pair()
        first, second = client.seal(b"a"), client.seal(b"b")
        self.assertRefused(gate, second)

    def test_skip(self):
        client, gate = pair()
        client.seal(b"dropped on the way")
        self.assertRefused(gate, client.seal(b"b"))

    def test_forged(self):
        """
        A flipped bit anywhere (ciphertext, tag, or the counter, which is
        the nonce) fails; so does a frame sealed under another key, and a
        frame too short to hold a tag.
        """
        client, gate = pair()
        sealed = client.seal(b"hello there")
        for i in range(8, len(sealed)):
            forged = bytearray(sealed)
            forged[i] ^= 0x01
            self.assertRefused(gate, bytes(forged))
        other, _ = pair()
        self.assertRefused(gate, other.seal(b"hello there"))
        self.assertRefused(gate, sealed[:OVERHEAD - 1])
        self.assertRefused(gate, b"")
        # None of these moved the counter: the real frame still opens.
        self.assertEqual(gate.open(sealed), b"hello there")

    def test_rekey_each_direction(self):
        """
        Each side rotates its own direction; the other follows on reading
        the rekey, and the next frame is counter 0 under the new key.
        """
        client, gate = pair()
        gate.open(client.seal(b"one"))
        self.assertIsNone(gate.open(client.rekey()))
        self.assertEqual(client.send_counter, 0)
        self.assertEqual(gate.recv_counter, 0)
        self.assertEqual(client.keys[0], gate.keys[1])
        self.assertEqual(gate.open(client.seal(b"two")), b"two")
        self.assertIsNone(client.open(gate.rekey()))
        self.assertEqual(client.open(gate.seal(b"three")), b"three")
        self.assertEqual(client.rotations, (1, 1))
        self.assertEqual(gate.rotations, (1, 1))

    def test_rotated_key_is_hkdf_of_old(self):
        client, gate = pair()
        old = client.keys[0]
        gate.open(client.rekey())
        self.assertEqual(client.keys[0],
                         hkdf_sha256(old, b"", b"mmogate-v1 rekey", 32))

    def test_old_key_refused_after_rekey(self):
        """
        After a rotation a frame under the old key, even with counter 0,
        does not open.
        """
        client, gate = pair()
        old_key = client.keys[0]
        gate.open(client.rekey())
        stale = SecureChannel(old_key, b"\x00" * 32)
        self.assertRefused(gate, stale.seal(b'{"t":"ping"}'))

    def test_rekey_recognised_as_json(self):
        """
        Any JSON object with C{t} C{rekey} rotates; C{"rekey"} elsewhere in
        an envelope does not.
        """
        client, gate = pair()
        self.assertIsNone(gate.open(client.seal(b'{ "t" : "rekey", "x": 1}')))
        client._send.rotate()
        data = b'{"t":"req","id":1,"route":"rekey","data":"rekey"}'
        self.assertEqual(gate.open(client.seal(data)), data)
        self.assertEqual(gate.rotations, (0, 1))

    def test_rekey_spelt_with_escapes(self):
        """
        A C{t} of C{rekey} written with JSON escapes is a rekey too; an
        escape elsewhere does not make an envelope one.
        """
        client, gate = pair()
        for spelt in (b'{"t":"\\u0072ekey"}', b'{"t":"rek\\u0065y"}',
                      b'{"\\u0074":"rekey"}'):
            self.assertIsNone(gate.open(client.seal(spelt)), spelt)
            client._send.rotate()
        data = b'{"t":"ping","ts":"\\u0041"}'
        self.assertEqual(gate.open(client.seal(data)), data)
        self.assertEqual(gate.rotations, (0, 3))

    def test_rekey_due(self):
        client, _ = pair()
        for _ in range(3):
            client.seal(b"x")
        self.assertFalse(client.rekey_due(4))
        self.assertTrue(client.rekey_due(3))


class HandshakeTests(SynchronousTestCase):
    def test_client_hello_checked(self):
        good = base64.b64encode(b"\x09" * 32).decode()
        self.assertEqual(parse_client_hello(
            json.dumps({"v": 1, "pub": good, "t": "hello", "extra": 1})),
            b"\x09" * 32)
        for bad in [b"", b"\xff", b"[]", b"null", b'"hello"',
                    json.dumps({"t": "login", "v": 1, "pub": good}),
                    json.dumps({"t": "hello", "pub": good}),
                    json.dumps({"t": "hello", "v": True, "pub": good}),
                    json.dumps({"t": "hello", "v": 2, "pub": good}),
                    json.dumps({"t": "hello", "v": "1", "pub": good}),
                    json.dumps({"t": "hello", "v": 1}),
                    json.dumps({"t": "hello", "v": 1, "pub": 5}),
                    json.dumps({"t": "hello", "v": 1, "pub": good[:-4]}),
                    json.dumps({"t": "hello", "v": 1, "pub": good + "AAAA"}),
                    json.dumps({"t": "hello", "v": 1, "pub": " " + good}),
                    json.dumps({"t": "hello", "v": 1, "pub": "é" * 44}),
                    b"[" * 100000]:
            self.assertRaises(ChannelError, parse_client_hello, bad)

    def test_low_order_point_refused(self):
        signer = Ed25519PrivateKey.generate()
        self.assertRaises(ChannelError, GateHandshake(signer).receive,
                          client_hello(b"\x00" * 32))

    def test_pinned_key_mismatch(self):
        signer = Ed25519PrivateKey.generate()
        other = raw_public(Ed25519PrivateKey.generate())
        hs = ClientHandshake(other)
        reply, _ = GateHandshake(signer).receive(hs.hello())
        e = self.assertRaises(ChannelError, hs.receive, reply)
        self.assertIn("pinned", str(e))
        self.assertIsNone(hs.gate_key)

    def test_bad_signature(self):
        """
        A signature that does not verify is refused, pinned or not; so is
        one made over another handshake's keys (a replayed gate hello).
        """
        signer = Ed25519PrivateKey.generate()
        for pinned in (None, raw_public(signer)):
            hs = ClientHandshake(pinned)
            reply, _ = GateHandshake(signer).receive(hs.hello())
            obj = json.loads(reply)
            sig = bytearray(base64.b64decode(obj["sig"]))
            sig[0] ^= 1
            obj["sig"] = base64.b64encode(bytes(sig)).decode()
            self.assertRaises(ChannelError, hs.receive,
                              json.dumps(obj).encode())
            earlier = ClientHandshake(pinned)
            replayed, _ = GateHandshake(signer).receive(earlier.hello())
            self.assertRaises(ChannelError, ClientHandshake(pinned).receive,
                              replayed)

    def test_gate_hello_checked(self):
        self.assertRaises(ChannelError, parse_gate_hello,
                          client_hello(b"\x01" * 32))

    def test_gate_signs_label_and_both_keys(self):
        signer = Ed25519PrivateKey.generate()
        hs = ClientHandshake()
        reply, _ = GateHandshake(signer).receive(hs.hello())
        g, k, s = parse_gate_hello(reply)
        x = parse_client_hello(hs.hello())
        Ed25519PublicKey.from_public_bytes(k).verify(s, signed_data(x, g))
        self.assertEqual(signed_data(x, g)[:10], b"mmogate-v1")
        hs.receive(reply)
        self.assertEqual(hs.gate_key, raw_public(signer))

    def test_keys_split(self):
        c2g, g2c = handshake_keys(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)
        self.assertEqual(c2g + g2c, hkdf_sha256(b"\x01" * 32, b"\x02" * 32
                                                + b"\x03" * 32,
                                                b"mmogate-v1", 64))


# The gate's listener over an in-memory transport.

PEER = IPv4Address("TCP", "10.9.8.7", 4321)


class Peer:
    """
    A client of L{GateSecureTCPProtocol} over a L{StringTransport}, driven
    step by step by the test.
    """

    def __init__(self, factory, pinned=None):
        self.protocol = factory.buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.protocol.makeConnection(self.transport)
        self.handshake = ClientHandshake(pinned)
        self.decoder = FrameDecoder(1 << 24)
        self.channel = None
        self.rekeys = 0

    def hello(self):
        self.protocol.dataReceived(frame(self.handshake.hello()))
        (reply,) = self.raw()
        self.channel = self.handshake.receive(reply)

    def raw(self):
        data = self.transport.value()
        self.transport.clear()
        return self.decoder.feed(data)

    def sealed(self, obj):
        return self.channel.seal_framed(json.dumps(obj).encode())

    def send(self, **obj):
        self.protocol.dataReceived(self.sealed(obj))

    def received(self):
        """
        The envelopes the gate sent since the last call, opened in order;
        its rekeys are counted, not listed.
        """
        out = []
        for sealed in self.raw():
            plain = self.channel.open(sealed)
            if plain is None:
                self.rekeys += 1
            else:
                out.append(json.loads(plain))
        return out

    @property
    def closed(self):
        return self.transport.disconnecting


class GateListenerTests(SynchronousTestCase):
    def setUp(self):
        self.signer = Ed25519PrivateKey.generate()

    def factory(self, rekey_frames=1000, rekey_seconds=3600.0, **changes):
        self.stack = Stack(**changes)
        config = self.stack.config
        return GateSecureTCPFactory(
            self.stack.sessions, config["session.max_frame"],
            self.stack.clock, self.signer,
            max_outbuf=config["session.max_outbuf"],
            rekey_frames=rekey_frames, rekey_seconds=rekey_seconds,
            handshake_timeout=config["session.login_timeout"])

    def connected(self, **kw):
        peer = Peer(self.factory(**kw), raw_public(self.signer))
        peer.hello()
        return peer

    def login(self, peer, name="alice"):
        peer.send(t="login", id=1, data={"name": name})
        (resp,) = peer.received()
        self.assertEqual((resp["t"], resp["player_id"]), ("resp", name))

    # Handshake.

    def test_session_only_after_hello(self):
        peer = Peer(self.factory())
        self.assertEqual(self.stack.sessions.sessions, {})
        self.assertIsNone(peer.protocol.session)
        peer.hello()
        (session,) = self.stack.sessions.sessions.values()
        self.assertIs(session, peer.protocol.session)
        self.assertEqual(session.transport_name, "tcp+enc")
        self.assertEqual(session.peer, "10.9.8.7:4321")
        self.assertTrue(verifyObject(IClientConnection, peer.protocol))

    def test_login_and_ping(self):
        peer = self.connected()
        self.login(peer)
        peer.send(t="ping", ts=7)
        self.assertEqual(peer.received(), [{"t": "pong", "ts": 7}])

    def test_hello_split_anywhere(self):
        peer = Peer(self.factory())
        data = frame(peer.handshake.hello())
        for i in range(len(data)):
            peer.protocol.dataReceived(data[i:i + 1])
        (reply,) = peer.raw()
        peer.channel = peer.handshake.receive(reply)
        peer.send(t="ping", ts=1)
        self.assertEqual(peer.received(), [{"t": "pong", "ts": 1}])

    def assertEndedSilently(self, peer):
        self.assertEqual(peer.transport.value(), b"")
        self.assertTrue(peer.closed)

    def test_no_hello_in_time(self):
        """
        A connection without a complete hello after session.login_timeout
        is closed, without an answer and without a session.
        """
        peer = Peer(self.factory(session__login_timeout=5))
        peer.protocol.dataReceived(frame(peer.handshake.hello())[:10])
        self.stack.clock.advance(4.9)
        self.assertFalse(peer.closed)
        self.stack.clock.advance(0.1)
        self.assertEndedSilently(peer)
        self.assertEqual(self.stack.sessions.sessions, {})
        self.stack.clock.advance(10)  # the closing timer aborts it
        self.assertTrue(peer.transport.disconnected)

    def test_login_timeout_counts_from_accept(self):
        """
        One session.login_timeout from the accept in all: a hello at 4.5 s
        of 5 leaves the session half a second to log in, not 5 more.
        """
        peer = Peer(self.factory(session__login_timeout=5))
        self.stack.clock.advance(4.5)
        peer.hello()
        self.stack.clock.advance(0.4)
        self.assertFalse(peer.closed)
        self.stack.clock.advance(0.1)
        self.assertTrue(peer.closed)
        (err,) = peer.received()
        self.assertEqual(err["code"], errors.NOT_AUTHENTICATED)
        self.assertIn("within 5 seconds", err["msg"])

    def test_signing_key_read_once(self):
        """
        The gate's public key is derived once per listener, not once per
        handshake.
        """
        class CountingSigner:
            publics = 0

            def __init__(self, key):
                self.key = key

            def public_key(self):
                self.publics += 1
                return self.key.public_key()

            def sign(self, data):
                return self.key.sign(data)

        signer = CountingSigner(self.signer)
        self.stack = Stack()
        factory = GateSecureTCPFactory(self.stack.sessions, 1000,
                                       self.stack.clock, signer)
        for _ in range(3):
            Peer(factory, raw_public(self.signer)).hello()
        self.assertEqual(len(self.stack.sessions.sessions), 3)
        self.assertEqual(signer.publics, 1)

    def own_timers(self, peer):
        protocol = peer.protocol
        return [c for c in self.stack.clock.getDelayedCalls()
                if getattr(c.func, "__self__", None) is protocol]

    def test_hello_cancels_timeout(self):
        peer = self.connected(session__login_timeout=5)
        self.login(peer)
        self.assertEqual([c.func.__name__ for c in self.own_timers(peer)],
                         ["_rekey_timer"])
        self.stack.clock.advance(6)
        self.assertFalse(peer.closed)

    def test_bad_first_frames(self):
        """
        Anything but a valid hello first (garbage, another envelope, a
        frame over session.max_frame, an HTTP request) is closed without
        an answer and opens no session.
        """
        bad = [frame(b"garbage"), frame(b'{"t":"login","id":1}'),
               frame(b'{"t":"hello","v":1,"pub":"AAAA"}'),
               struct.pack(">I", 65537), b"GET / HTTP/1.1\r\n\r\n",
               frame(client_hello(b"\x00" * 32))]
        for data in bad:
            peer = Peer(self.factory())
            peer.protocol.dataReceived(data)
            self.assertEndedSilently(peer)
            self.assertEqual(self.stack.sessions.sessions, {})
            peer.protocol.dataReceived(frame(peer.handshake.hello()))
            self.assertEqual(peer.transport.value(), b"")

    def test_over_limits_refused_before_hello(self):
        """
        Connections count against limits.max_per_ip like plain TCP ones;
        a refused one gets the plain err busy and no session.
        """
        factory = self.factory(limits__max_per_ip=1)
        first = Peer(factory)
        refused = Peer(factory)
        (err,) = [json.loads(p) for p in refused.raw()]
        self.assertEqual((err["t"], err["code"]), ("err", "busy"))
        first.protocol.connectionLost(Failure(ConnectionDone()))
        again = Peer(factory)
        again.hello()
        self.assertEqual(len(self.stack.sessions.sessions), 1)

    def test_not_accepting_after_connect(self):
        factory = self.factory()
        peer = Peer(factory)
        self.stack.sessions.accepting = False
        peer.protocol.dataReceived(frame(peer.handshake.hello()))
        self.assertEndedSilently(peer)
        self.assertEqual(self.stack.sessions.sessions, {})
        self.assertIsInstance(factory.buildProtocol(PEER), Hangup)

    # Channel violations end the connection without an answer.

    def violate(self, make_bad):
        peer = self.connected()
        self.login(peer)
        session = peer.protocol.session
        data = make_bad(peer)
        peer.protocol.dataReceived(data)
        self.assertEndedSilently(peer)
        self.assertFalse(session.closed)  # until the socket is gone
        peer.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(session.closed)
        self.assertEqual(self.stack.sessions.sessions, {})
        # Nothing read after the violation reached the session.
        self.assertEqual(self.stack.backend.calls, [])

    def test_replay(self):
        def replay(peer):
            frame_ = peer.sealed({"t": "req", "id": 2, "route": "a"})
            peer.protocol.dataReceived(frame_)
            peer.received()
            self.stack.backend.calls.clear()
            return frame_
        self.violate(replay)

    def test_reorder(self):
        def reorder(peer):
            first = peer.sealed({"t": "req", "id": 2, "route": "a"})
            second = peer.sealed({"t": "req", "id": 3, "route": "b"})
            return second + first
        self.violate(reorder)

    def test_skip(self):
        def skip(peer):
            peer.sealed({"t": "ping"})
            return peer.sealed({"t": "req", "id": 3, "route": "b"})
        self.violate(skip)

    def test_forged_tag(self):
        def forge(peer):
            data = bytearray(peer.sealed({"t": "req", "id": 2, "route": "a"}))
            data[-1] ^= 0x80
            return bytes(data)
        self.violate(forge)

    def test_wrong_key(self):
        def wrong_key(peer):
            other, _ = pair()
            return other.seal_framed(b'{"t":"req","id":2,"route":"a"}')
        self.violate(wrong_key)

    def test_short_frame(self):
        self.violate(lambda peer: frame(b"\x00" * 8 + b"short"))

    def test_unsealed_envelope(self):
        self.violate(lambda peer: frame(b'{"t":"req","id":2,"route":"a"}'))

    def test_good_frames_before_violation_served(self):
        peer = self.connected()
        good = peer.sealed({"t": "ping", "ts": 1})
        peer.sealed({"t": "ping", "ts": 2})  # lost
        bad = peer.sealed({"t": "ping", "ts": 3})
        peer.protocol.dataReceived(good + bad)
        self.assertEqual(peer.received(), [{"t": "pong", "ts": 1}])
        self.assertTrue(peer.closed)
        peer.protocol.dataReceived(peer.sealed({"t": "ping", "ts": 4}))
        self.assertEqual(peer.transport.value(), b"")

    # Ordinary errors are answered, sealed.

    def test_bad_json_answered_sealed(self):
        peer = self.connected()
        peer.protocol.dataReceived(peer.channel.seal_framed(b"[1]"))
        (err,) = peer.received()
        self.assertEqual(err["code"], errors.BAD_JSON)
        self.assertTrue(peer.closed)

    def test_frame_limit_is_on_the_envelope(self):
        """
        An envelope of session.max_frame bytes fits (its sealed frame is 24
        bytes more); a larger frame is answered frame_too_large, sealed.
        """
        peer = self.connected(session__max_frame=64)
        ping = b'{"t":"ping","ts":"' + b"x" * (64 - 20) + b'"}'
        self.assertEqual(len(ping), 64)
        peer.protocol.dataReceived(peer.channel.seal_framed(ping))
        self.assertEqual(peer.received()[0]["t"], "pong")
        peer.protocol.dataReceived(struct.pack(">I", 64 + OVERHEAD + 1))
        (err,) = peer.received()
        self.assertEqual(err["code"], errors.FRAME_TOO_LARGE)
        self.assertIn("65 bytes", err["msg"])
        self.assertTrue(peer.closed)

    def test_kick_sealed_then_closed(self):
        peer = self.connected()
        self.login(peer)
        peer.protocol.session.kick("admin", "bye")
        (kick,) = peer.received()
        self.assertEqual(kick["reason"], "admin")
        self.assertTrue(peer.closed)

    # Rotation.

    def test_client_rekeys_any_time(self):
        """
        The client may rotate before any frame, between frames, and many
        times in a row; the rekey envelope never reaches the session.
        """
        peer = self.connected()
        peer.protocol.dataReceived(peer.channel.rekey_framed())
        self.login(peer)
        for n in range(20):
            for _ in range(n % 3):
                peer.protocol.dataReceived(peer.channel.rekey_framed())
            peer.send(t="ping", ts=n)
        self.assertEqual(peer.received(),
                         [{"t": "pong", "ts": n} for n in range(20)])
        self.assertEqual(peer.protocol.channel.rotations[1], 1 + 19)
        self.assertFalse(peer.closed)

    def test_client_rekeys_rate_limited(self):
        """
        A client's rekeys never reach the session but cost what a ping
        does of session.rate / session.burst: a flood of them gets strikes
        and is closed (a sealed err rate_limited).
        """
        peer = self.connected(session__rate=2.0, session__burst=3,
                              session__rate_strikes=4)
        self.login(peer)
        self.stack.clock.advance(10)
        for _ in range(int(3 / CHEAP_COST) + 3):
            peer.protocol.dataReceived(peer.channel.rekey_framed())
        self.assertFalse(peer.closed)
        self.assertEqual(peer.received(), [])
        peer.protocol.dataReceived(peer.channel.rekey_framed())
        self.assertTrue(peer.closed)
        (err,) = peer.received()
        self.assertEqual((err["t"], err["code"]),
                         ("err", errors.RATE_LIMITED))

    def test_slow_consumer_kick_is_last_after_a_rotation(self):
        """
        When the write of the gate's own rekey is the one that overflows
        session.max_outbuf, the sealed kick slow_consumer it causes is the
        last frame: the push that was to follow the rekey is not written.
        """
        peer = self.connected(rekey_frames=1)
        self.login(peer)
        flow = peer.protocol._flow
        flow.pauseProducing()  # the client stopped reading
        flow.limit = 40  # a sealed rekey frame is 41 bytes
        self.stack.push(["alice"], data="after")
        order = []
        for sealed in peer.raw():
            plain = peer.channel.open(sealed)
            if plain is None:
                order.append("rekey")
            else:
                message = json.loads(plain)
                order.append((message["t"], message.get("reason")))
        self.assertEqual(order, ["rekey", ("kick", "slow_consumer")])
        self.assertTrue(peer.closed)
        self.assertEqual(self.own_timers(peer), [])

    def test_gate_rekeys_after_frames(self):
        """
        With rekey_frames = 3 each gate key seals three envelopes, then its
        rekey (counter 3).
        """
        peer = self.connected(rekey_frames=3)
        for n in range(10):
            peer.send(t="ping", ts=n)
        self.assertEqual(peer.received(),
                         [{"t": "pong", "ts": n} for n in range(10)])
        self.assertEqual(peer.rekeys, 3)
        self.assertEqual(peer.protocol.channel.send_counter, 1)

    def test_gate_rekeys_after_time(self):
        """
        A key that has sealed something is rotated rekey_seconds after it
        was installed; an unused key is kept.
        """
        peer = self.connected(rekey_seconds=10)
        clock = self.stack.clock
        clock.advance(10)
        self.assertEqual(peer.transport.value(), b"")  # unused: kept
        self.login(peer)
        clock.advance(10)
        peer.received()
        self.assertEqual(peer.rekeys, 1)
        peer.rekeys = 0
        clock.advance(10)  # unused since that rotation: kept
        self.assertEqual(peer.transport.value(), b"")
        peer.send(t="ping", ts=1)
        clock.advance(9.9)
        self.assertEqual(peer.received(), [{"t": "pong", "ts": 1}])
        self.assertEqual(peer.rekeys, 0)
        clock.advance(0.1)
        self.assertEqual(peer.received(), [])
        self.assertEqual(peer.rekeys, 1)
        self.assertEqual(peer.protocol.channel.send_counter, 0)
        peer.send(t="ping", ts=2)
        self.assertEqual(peer.received(), [{"t": "pong", "ts": 2}])
        clock.advance(10)
        peer.received()
        self.assertEqual(peer.rekeys, 2)

    def test_frame_rotation_restarts_the_clock(self):
        peer = self.connected(rekey_frames=1, rekey_seconds=10)
        clock = self.stack.clock
        peer.send(t="ping", ts=1)
        clock.advance(8)
        peer.send(t="ping", ts=2)  # rotates by count first
        peer.received()
        self.assertEqual(peer.rekeys, 1)
        clock.advance(9)
        peer.received()
        self.assertEqual(peer.rekeys, 1)
        clock.advance(1)
        peer.received()
        self.assertEqual(peer.rekeys, 2)

    def test_timers_stop_with_the_connection(self):
        peer = self.connected(rekey_seconds=10)
        peer.send(t="ping", ts=1)
        self.assertTrue(self.own_timers(peer))
        peer.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.own_timers(peer), [])
        before = Peer(self.factory())
        before.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.own_timers(before), [])

    def test_no_push_lost_across_rotations(self):
        """
        1000 persistent pushes with rekey_frames = 7 arrive in seq order,
        none missing, while the client rotates its own direction too.
        """
        peer = self.connected(rekey_frames=7)
        self.login(peer)
        got = []
        for n in range(1000):
            self.stack.push(["alice"], data=n)
            if n % 50 == 49:
                got += peer.received()
                peer.protocol.dataReceived(peer.channel.rekey_framed())
                peer.send(t="ack", seq=got[-1]["seq"])
        got += peer.received()
        self.assertEqual([(m["seq"], m["data"]) for m in got],
                         [(n + 1, n) for n in range(1000)])
        # 1001 frames (the login resp too): a rotation before every 8th.
        self.assertEqual(peer.rekeys, 1000 // 7)
        self.assertEqual(peer.protocol.channel.rotations, (1000 // 7, 20))
        self.assertFalse(peer.closed)


# The key file.

class KeyFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "gate.pem")
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver,
                        self.logged.append)

    def test_created_0600(self):
        """
        A missing key file is created, mode 0600 even under a permissive
        umask, holding an Ed25519 PEM key; its public key is logged.
        """
        old = os.umask(0)
        try:
            key = load_or_create(self.path)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path, "rb") as f:
            loaded = serialization.load_pem_private_key(f.read(), None)
        self.assertEqual(raw_public(loaded), raw_public(key))
        self.assertEqual(os.listdir(self.dir), ["gate.pem"])
        infos = [e for e in self.logged
                 if e.get("public_key") == public_key_b64(key)]
        self.assertEqual(len(infos), 1)
        self.assertEqual(infos[0]["how"], "created")

    def test_reused(self):
        first = load_or_create(self.path)
        with open(self.path, "rb") as f:
            content = f.read()
        second = load_or_create(self.path)
        self.assertEqual(raw_public(first), raw_public(second))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), content)

    def test_created_by_another_meanwhile(self):
        """
        If another process creates the file first, its key is kept.
        """
        from gate import keys
        theirs = load_or_create(os.path.join(self.dir, "theirs.pem"))
        os.link(os.path.join(self.dir, "theirs.pem"), self.path)
        self.assertFalse(keys._create(self.path))
        self.assertEqual(raw_public(load_or_create(self.path)),
                         raw_public(theirs))

    def assertBad(self, content=None, path=None):
        path = path or self.path
        if content is not None:
            with open(path, "wb") as f:
                f.write(content)
        e = self.assertRaises(KeyFileError, load_or_create, path)
        self.assertTrue(str(e).startswith("encrypt.key_file: "), str(e))
        self.assertIn(path, str(e))
        return str(e)

    def test_bad_files(self):
        self.assertIn("no PEM private key", self.assertBad(b"not a key"))
        self.assertIn("no PEM private key", self.assertBad(b""))
        ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        self.assertIn("not an Ed25519", self.assertBad(ec_key))
        locked = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"))
        self.assertIn("encrypted", self.assertBad(locked))
        self.assertIn("cannot read", self.assertBad(path=self.dir))
        self.assertIn("cannot create", self.assertBad(
            path=os.path.join(self.dir, "missing", "k.pem")))

    def test_loose_mode_warned(self):
        load_or_create(self.path)
        os.chmod(self.path, 0o644)
        load_or_create(self.path)
        self.assertTrue([e for e in self.logged
                         if e.get("log_level").name == "warn"
                         and e.get("key") == "encrypt.key_file"])

    def test_service_start_error(self):
        """
        A gate with the channel on and a bad key file does not start; the
        error names encrypt.key_file (twistd prints it as one line).
        """
        from gate.config import from_mapping
        from gate.service import GateService
        from gate.tap import Options, makeService
        with open(self.path, "wb") as f:
            f.write(b"junk")
        config = from_mapping({
            "api": {"key": "k"}, "auth": {"secret": "s" * 32},
            "backend": {"url": "http://backend.invalid"},
            "listen": {"tcp_secure": "tcp:0:interface=127.0.0.1"},
            "encrypt": {"key_file": self.path}})
        self.assertRaises(KeyFileError, GateService, config,
                          MemoryReactorClock())
        options = Options()
        options.gate_config = config
        e = self.assertRaises(SystemExit, makeService, options)
        self.assertIn("configuration error: encrypt.key_file", str(e.code))

    def test_public_key_option(self):
        """
        C{twistd mmogate --config FILE --public-key} prints the base64
        public key of encrypt.key_file (creating it) and exits 0.
        """
        from gate.tap import Options
        config = os.path.join(self.dir, "gate.toml")
        with open(config, "w") as f:
            f.write('[api]\nkey = "k"\n[auth]\nsecret = "%s"\n'
                    '[encrypt]\nkey_file = "%s"\n' % ("s" * 32, self.path))
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, Options().parseOptions,
                              ["--public-key", "--config", config])
        self.assertEqual(e.code, 0)
        key = load_or_create(self.path)
        self.assertEqual(out.getvalue(), public_key_b64(key) + "\n")
        self.assertEqual(parse_gate_key(out.getvalue()), raw_public(key))


# The Python client's side.

class Receiver:
    def __init__(self):
        self.connected = []
        self.payloads = []
        self.lost = []

    def payloadConnected(self, sender):
        self.connected.append(sender)

    def payloadReceived(self, payload):
        self.payloads.append(payload)

    def payloadLost(self, reason):
        self.lost.append(reason)


class ClientSideTests(SynchronousTestCase):
    def setUp(self):
        self.signer = Ed25519PrivateKey.generate()

    def connect(self, pinned=None, rekey_frames=100000):
        receiver = Receiver()
        protocol = SecureFramedFactory(receiver, 1 << 16, pinned,
                                       rekey_frames).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        decoder = FrameDecoder(1 << 16)
        (hello,) = decoder.feed(transport.value())
        transport.clear()
        reply, gate = GateHandshake(self.signer).receive(hello)
        protocol.dataReceived(frame(reply))
        return receiver, protocol, transport, gate, decoder

    def test_connected_after_handshake(self):
        receiver, protocol, transport, gate, decoder = self.connect(
            raw_public(self.signer))
        self.assertEqual(receiver.connected, [protocol])
        self.assertTrue(verifyObject(IPayloadSender, protocol))
        self.assertEqual(protocol.gate_key, raw_public(self.signer))
        protocol.sendPayload(b'{"t":"ping"}')
        (sealed,) = decoder.feed(transport.value())
        self.assertEqual(gate.open(sealed), b'{"t":"ping"}')
        protocol.dataReceived(gate.rekey_framed()
                              + gate.seal_framed(b'{"t":"pong"}'))
        self.assertEqual(receiver.payloads, [b'{"t":"pong"}'])

    def test_pinned_mismatch_hangs_up(self):
        other = raw_public(Ed25519PrivateKey.generate())
        receiver, protocol, transport, gate, decoder = self.connect(other)
        self.assertEqual(receiver.connected, [])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        protocol.sendPayload(b'{"t":"login"}')
        self.assertEqual(transport.value(), b"")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn("pinned", receiver.lost[0].getErrorMessage())

    def test_bad_gate_frame_hangs_up(self):
        receiver, protocol, transport, gate, decoder = self.connect()
        good = gate.seal_framed(b'{"t":"pong"}')
        protocol.dataReceived(good + good)
        self.assertEqual(receiver.payloads, [b'{"t":"pong"}'])
        self.assertTrue(transport.disconnecting)

    def test_refusal_reported(self):
        """
        A gate over its connection limits answers an unsealed err busy
        instead of its hello: the client hangs up, saying why.
        """
        receiver = Receiver()
        protocol = SecureFramedFactory(receiver).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(frame(
            b'{"t":"err","code":"busy","msg":"too many connections"}'))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(receiver.connected, [])
        self.assertIn("refused the connection: busy: too many",
                      receiver.lost[0].getErrorMessage())

    def test_client_rotates_after_frames(self):
        receiver, protocol, transport, gate, decoder = self.connect(
            rekey_frames=2)
        for n in range(7):
            protocol.sendPayload(b"%d" % n)
        opened = [gate.open(p) for p in decoder.feed(transport.value())]
        self.assertEqual([p for p in opened if p is not None],
                         [b"%d" % n for n in range(7)])
        self.assertEqual(opened.count(None), 3)
        self.assertEqual(gate.rotations, (0, 3))

    def test_gate_client_arguments(self):
        from twisted.internet.task import Clock
        key = public_key_b64(self.signer)
        GateClient(Clock(), "tcp+enc://127.0.0.1:1", login={}, gate_key=key)
        for bad in ("nope", base64.b64encode(b"x" * 31).decode()):
            self.assertRaises(ValueError, GateClient, Clock(),
                              "tcp+enc://127.0.0.1:1", login={},
                              gate_key=bad)
        self.assertRaises(ValueError, GateClient, Clock(),
                          "tcp://127.0.0.1:1", login={}, gate_key=key)
        self.assertRaises(ValueError, GateClient, Clock(),
                          "tcp+enc://127.0.0.1:1", login={}, rekey_frames=0)
        args = parse_args(["tcp+enc://h:1", "--name", "a", "--gate-key", key])
        self.assertEqual(args.gate_key, key)
