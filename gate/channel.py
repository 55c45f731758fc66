"""
The encrypted channel of PROTOCOL.md section 8, without any I/O.

L{GateHandshake} and L{ClientHandshake} turn the two C{hello} payloads into
a L{SecureChannel}; the channel seals and opens the payloads that follow,
counts them strictly per direction and rotates keys on C{rekey}. The gate's
protocol (L{gate.secure_tcp}) and the Python client
(L{gate.client.secure}) only move these bytes, so everything here is
tested byte for byte, including the test vector of C{docs/encryption.md}.

Any failure is a L{ChannelError}; the side that gets one ends the
connection without an answer.
"""

import base64
import binascii
import json
import struct

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import \
    Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey, X25519PublicKey)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
#: HKDF info of the handshake and the prefix of what the gate signs.
LABEL = b"mmogate-v1"
#: HKDF info of a key rotation.
REKEY_LABEL = b"mmogate-v1 rekey"
KEY_SIZE = 32
COUNTER_SIZE = 8
TAG_SIZE = 16
#: Bytes a sealed payload has beyond its envelope: counter and GCM tag.
OVERHEAD = COUNTER_SIZE + TAG_SIZE
#: What a side sends to rotate its direction (any JSON object whose C{t}
#: is C{"rekey"} is read as one).
REKEY_ENVELOPE = b'{"t":"rekey"}'
#: Counters are 8 bytes; a direction must rotate before it wraps.
MAX_COUNTER = (1 << 64) - 1

_COUNTER = struct.Struct(">Q")
_HEADER_AND_COUNTER = struct.Struct(">IQ")
_NONCE_PAD = b"\x00" * 4
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class ChannelError(Exception):
    """
    The peer broke the channel: a bad hello, a wrong key or signature, a
    frame with an unexpected counter or one that does not decrypt.
    """


def b64(data):
    """
    Standard base64 text of C{data}, as JSON carries binary values.
    """
    return base64.b64encode(data).decode("ascii")


def unb64(value, size, name):
    """
    The C{size} bytes that the base64 string C{value} holds.

    @raise ChannelError: if it is not strict base64 of exactly that size.
    """
    if not isinstance(value, str):
        raise ChannelError(f"'{name}' must be a base64 string")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ChannelError(f"'{name}' is not base64") from None
    if len(data) != size:
        raise ChannelError(f"'{name}' must hold {size} bytes, not "
                           f"{len(data)}")
    return data


def raw_public(key):
    """
    The 32 raw bytes of an X25519 or Ed25519 public (or private) key.
    """
    if hasattr(key, "public_key"):
        key = key.public_key()
    return key.public_bytes(*_RAW)


def handshake_keys(shared, client_pub, gate_pub):
    """
    C{(client_to_gate, gate_to_client)} from the X25519 shared secret:
    HKDF-SHA256, salt X + G, info C{b"mmogate-v1"}, 64 bytes split in two.
    """
    okm = HKDF(hashes.SHA256(), 2 * KEY_SIZE, client_pub + gate_pub,
               LABEL).derive(shared)
    return okm[:KEY_SIZE], okm[KEY_SIZE:]


def next_key(key):
    """
    The key that follows C{key} in one direction after a C{rekey}.
    """
    return HKDF(hashes.SHA256(), KEY_SIZE, b"", REKEY_LABEL).derive(key)


def signed_data(client_pub, gate_pub):
    """
    What the gate's long-term key signs: C{b"mmogate-v1" + X + G}.
    """
    return LABEL + client_pub + gate_pub


def _encode(obj):
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _json_object(payload):
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ChannelError("hello is not JSON") from None
    if not isinstance(obj, dict):
        raise ChannelError("hello is not a JSON object")
    return obj


def _hello_fields(payload):
    obj = _json_object(payload)
    if obj.get("t") != "hello":
        raise ChannelError("the first frame must be a hello")
    version = obj.get("v")
    if type(version) is not int or version != VERSION:
        raise ChannelError(f"unsupported channel version {version!r}")
    return obj


def client_hello(client_pub):
    """
    The client's hello payload: C{{"t":"hello","v":1,"pub":X}}.
    """
    return _encode({"t": "hello", "v": VERSION, "pub": b64(client_pub)})


def gate_hello(gate_pub, key, sig):
    """
    The gate's hello payload: C{{"t":"hello","v":1,"pub":G,"key":K,"sig":S}}.
    """
    return _encode({"t": "hello", "v": VERSION, "pub": b64(gate_pub),
                    "key": b64(key), "sig": b64(sig)})


def parse_client_hello(payload):
    """
    The client's X25519 public key from its hello.

    @raise ChannelError: for anything but a version 1 hello with a 32-byte
        C{pub}. Other fields are ignored.
    """
    return unb64(_hello_fields(payload).get("pub"), KEY_SIZE, "pub")


def parse_gate_hello(payload):
    """
    C{(G, K, S)} from the gate's hello.
    """
    obj = _hello_fields(payload)
    return (unb64(obj.get("pub"), KEY_SIZE, "pub"),
            unb64(obj.get("key"), KEY_SIZE, "key"),
            unb64(obj.get("sig"), 64, "sig"))


def _exchange(private, peer_pub):
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    except ValueError:
        # A low-order point gives an all-zero secret: refused.
        raise ChannelError("unusable X25519 public key") from None


class GateHandshake:
    """
    The gate's side: reads the client's hello, answers with its own,
    signed by the gate's long-term key.

    @param signing_key: the gate's L{Ed25519PrivateKey}.
    @param ephemeral: the X25519 private key to use (default: a fresh one;
        fixed only for the test vector).
    @param public: the raw bytes of C{signing_key}'s public key, which a
        listener computes once rather than per handshake (default: derived
        here).
    """

    def __init__(self, signing_key, ephemeral=None, public=None):
        self._signing_key = signing_key
        self._public = public if public is not None else raw_public(
            signing_key)
        self._ephemeral = ephemeral or X25519PrivateKey.generate()

    def receive(self, payload):
        """
        @return: C{(reply payload, SecureChannel)}.
        @raise ChannelError: if C{payload} is not a usable hello.
        """
        client_pub = parse_client_hello(payload)
        gate_pub = raw_public(self._ephemeral)
        shared = _exchange(self._ephemeral, client_pub)
        self._ephemeral = None  # one use: forward secrecy
        sig = self._signing_key.sign(signed_data(client_pub, gate_pub))
        c2g, g2c = handshake_keys(shared, client_pub, gate_pub)
        reply = gate_hello(gate_pub, self._public, sig)
        return reply, SecureChannel(send_key=g2c, recv_key=c2g)


class ClientHandshake:
    """
    The client's side.

    @param pinned_key: the gate's Ed25519 public key (32 raw bytes); a
        hello signed by any other key is refused. Without it the signature
        is still checked against the key the gate names.
    @param ephemeral: the X25519 private key (default: a fresh one).
    @ivar gate_key: the gate's Ed25519 public key once its hello is read.
    """

    def __init__(self, pinned_key=None, ephemeral=None):
        if pinned_key is not None and len(pinned_key) != KEY_SIZE:
            raise ValueError("a pinned gate key is 32 bytes")
        self._pinned = pinned_key
        self._ephemeral = ephemeral or X25519PrivateKey.generate()
        self._client_pub = raw_public(self._ephemeral)
        self.gate_key = None

    def hello(self):
        return client_hello(self._client_pub)

    def receive(self, payload):
        """
        @return: the L{SecureChannel} for the rest of the connection.
        @raise ChannelError: if the hello is malformed, names a key other
            than the pinned one, or its signature does not verify.
        """
        gate_pub, key, sig = parse_gate_hello(payload)
        if self._pinned is not None and key != self._pinned:
            raise ChannelError(f"the gate's key {b64(key)} is not the "
                               f"pinned key {b64(self._pinned)}")
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(
                sig, signed_data(self._client_pub, gate_pub))
        except (InvalidSignature, ValueError):
            raise ChannelError("the gate's hello signature does not "
                               "verify") from None
        shared = _exchange(self._ephemeral, gate_pub)
        self._ephemeral = None
        self.gate_key = key
        c2g, g2c = handshake_keys(shared, self._client_pub, gate_pub)
        return SecureChannel(send_key=c2g, recv_key=g2c)


class _Direction:
    __slots__ = ("key", "aead", "counter", "rotations")

    def __init__(self, key):
        self.rotations = 0
        self.install(key)

    def install(self, key):
        self.key = key
        self.aead = AESGCM(key)
        self.counter = 0

    def rotate(self):
        self.install(next_key(self.key))
        self.rotations += 1


def _is_rekey(plain):
    # Cheap test first: a substring scan, parsed only when it may match
    # (literally, or spelt with JSON escapes such as "\u0072ekey").
    if b'"rekey"' not in plain and b"\\u" not in plain:
        return False
    try:
        obj = json.loads(plain)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("t") == "rekey"


class SecureChannel:
    """
    Both directions of one established channel: a key and a counter each.

    Sealing and opening never skip, repeat or reorder a counter; a
    C{rekey} rotates the direction it travels in. What to rotate when is
    the caller's policy (L{rekey_due}).
    """

    def __init__(self, send_key, recv_key):
        self._send = _Direction(send_key)
        self._recv = _Direction(recv_key)

    @property
    def send_counter(self):
        """
        The counter of the next frame sealed (frames sent under this key).
        """
        return self._send.counter

    @property
    def recv_counter(self):
        return self._recv.counter

    @property
    def rotations(self):
        """
        C{(sent, received)}: how many times each direction was rotated.
        """
        return self._send.rotations, self._recv.rotations

    @property
    def keys(self):
        """
        C{(send key, receive key)} in use now (for tests and the vector).
        """
        return self._send.key, self._recv.key

    def seal(self, payload):
        """
        The sealed payload of one frame carrying C{payload}.
        """
        send = self._send
        counter = send.counter
        if counter > MAX_COUNTER:
            raise ChannelError("send counter exhausted; rekey first")
        prefix = _COUNTER.pack(counter)
        send.counter = counter + 1
        return prefix + send.aead.encrypt(_NONCE_PAD + prefix, payload, None)

    def seal_framed(self, payload):
        """
        L{seal}, with the 4-byte length header of PROTOCOL.md section 1:
        the bytes to write.
        """
        send = self._send
        counter = send.counter
        if counter > MAX_COUNTER:
            raise ChannelError("send counter exhausted; rekey first")
        sealed = send.aead.encrypt(_NONCE_PAD + _COUNTER.pack(counter),
                                   payload, None)
        send.counter = counter + 1
        return _HEADER_AND_COUNTER.pack(COUNTER_SIZE + len(sealed),
                                        counter) + sealed

    def rekey(self):
        """
        The sealed C{rekey} frame payload, the last under the current send
        key, after which that key is replaced and its counter restarts.
        """
        sealed = self.seal(REKEY_ENVELOPE)
        self._send.rotate()
        return sealed

    def rekey_framed(self):
        sealed = self.seal_framed(REKEY_ENVELOPE)
        self._send.rotate()
        return sealed

    def rekey_due(self, max_frames):
        """
        Whether the send key has carried C{max_frames} frames, so that the
        next one must go under a new key.
        """
        return self._send.counter >= max_frames

    def open(self, sealed):
        """
        The envelope in the sealed frame payload C{sealed}, or C{None} when
        it was the peer's C{rekey} (then the receive key has rotated).

        @raise ChannelError: for a short frame, a counter other than the
            next expected one, or a frame that does not authenticate. The
            channel is unusable afterwards.
        """
        recv = self._recv
        if len(sealed) < OVERHEAD:
            raise ChannelError(f"sealed frame of {len(sealed)} bytes is "
                               f"shorter than {OVERHEAD}")
        (counter,) = _COUNTER.unpack_from(sealed)
        if counter != recv.counter:
            raise ChannelError(f"frame counter {counter}, expected "
                               f"{recv.counter}")
        view = memoryview(sealed)
        try:
            plain = recv.aead.decrypt(_NONCE_PAD + bytes(view[:COUNTER_SIZE]),
                                      view[COUNTER_SIZE:], None)
        except InvalidTag:
            raise ChannelError(f"frame {counter} does not "
                               f"authenticate") from None
        recv.counter = counter + 1
        if _is_rekey(plain):
            recv.rotate()
            return None
        return plain

