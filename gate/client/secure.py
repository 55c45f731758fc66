"""
The client side of the encrypted channel (PROTOCOL.md section 8) for
C{tcp+enc://} addresses: the length framing of L{FramedProtocol}, a
handshake first, then every payload sealed.

The envelope logic above sees an ordinary L{IPayloadSender} once the
handshake is done; a gate whose hello is malformed, or (when a key is
pinned) signed by another key, or a frame that breaks the channel, drops
the connection at once, before anything is sent under an unverified key.
"""

import base64
import binascii
import json

from twisted.internet.protocol import Factory

from gate.channel import OVERHEAD, ChannelError, ClientHandshake
from gate.client.framing import DEFAULT_MAX_FRAME, FrameTooLarge, frame
from gate.client.protocol import FramedProtocol

#: Frames the client sends under one key before it rotates it.
DEFAULT_REKEY_FRAMES = 100000


def parse_gate_key(text):
    """
    The 32 raw bytes of a gate key given as base64 (what
    C{twistd mmogate --public-key} prints).

    @raise ValueError: if C{text} is not that.
    """
    try:
        key = base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (AttributeError, UnicodeEncodeError, binascii.Error):
        raise ValueError(f"gate key {text!r} is not base64") from None
    if len(key) != 32:
        raise ValueError(f"gate key {text!r} is not 32 bytes of base64 "
                         f"(an Ed25519 public key)")
    return key


def _refusal(payload):
    """
    The gate's unsealed C{err} in place of its hello (it refused the
    connection, e.g. over its connection limits) as a L{ChannelError}
    saying so, or C{None}. Unauthenticated, so only ever a reason to hang
    up.
    """
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not (isinstance(obj, dict) and obj.get("t") == "err"):
        return None
    return ChannelError(f"the gate refused the connection: "
                        f"{str(obj.get('code'))[:64]}: "
                        f"{str(obj.get('msg'))[:200]}")


class SecureFramedProtocol(FramedProtocol):
    """
    Framed payloads through a L{gate.channel.SecureChannel}.

    @param gate_key: the pinned Ed25519 public key of the gate (raw bytes),
        or C{None} to accept any key whose signature verifies.
    @param rekey_frames: frames sent under one key before the client
        rotates its direction.
    """

    channel = None
    #: The gate's Ed25519 public key (raw), once its hello verified.
    gate_key = None

    def __init__(self, receiver, max_frame=DEFAULT_MAX_FRAME, gate_key=None,
                 rekey_frames=DEFAULT_REKEY_FRAMES, ephemeral=None):
        FramedProtocol.__init__(self, receiver, max_frame + OVERHEAD)
        self._handshake = ClientHandshake(gate_key, ephemeral)
        self.rekey_frames = rekey_frames

    def connectionMade(self):
        self.transport.write(frame(self._handshake.hello()))

    def dataReceived(self, data):
        if self._error is not None:
            return
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as e:
            self.log.warn("gate sent an oversized frame ({size} bytes, "
                          "limit {limit}); dropping the connection",
                          size=e.size, limit=e.limit)
            self._open_all(e.payloads)
            self._fail(e)
            return
        self._open_all(payloads)

    def _open_all(self, payloads):
        for payload in payloads:
            if self._error is not None:
                return
            if self.channel is None:
                try:
                    self.channel = self._handshake.receive(payload)
                except ChannelError as e:
                    self._fail(_refusal(payload) or e)
                    return
                self.gate_key = self._handshake.gate_key
                self._handshake = None
                self.receiver.payloadConnected(self)
                continue
            try:
                plain = self.channel.open(payload)
            except ChannelError as e:
                self._fail(e)
                return
            if plain is not None:
                self.receiver.payloadReceived(plain)

    def _fail(self, error):
        if self._error is None:
            self.log.warn("encrypted channel to the gate failed: {error}",
                          error=error)
            self._error = error
            self.transport.abortConnection()

    def sendPayload(self, payload):
        channel = self.channel
        if channel is None or self._error is not None:
            return
        if channel.rekey_due(self.rekey_frames):
            self.transport.write(channel.rekey_framed())
        self.transport.write(channel.seal_framed(payload))


class SecureFramedFactory(Factory):
    """
    Builds the one L{SecureFramedProtocol} of a connection attempt.
    """

    def __init__(self, receiver, max_frame=DEFAULT_MAX_FRAME, gate_key=None,
                 rekey_frames=DEFAULT_REKEY_FRAMES):
        self.receiver = receiver
        self.max_frame = max_frame
        self.gate_key = gate_key
        self.rekey_frames = rekey_frames

    def buildProtocol(self, addr):
        protocol = SecureFramedProtocol(self.receiver, self.max_frame,
                                        self.gate_key, self.rekey_frames)
        protocol.factory = self
        return protocol
