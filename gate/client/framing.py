"""
Client side of the TCP framing (PROTOCOL.md section 1): a 4-byte unsigned
big-endian length, then that many bytes of payload.

The client keeps its own copy rather than importing the gate's so that the
client package stands alone: a game client installs it without pulling in
the server.
"""

import struct

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size

#: Largest payload the client accepts by default. The gate's own limit on
#: what it sends is policy, not contract, so the client is generous but
#: still bounded.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


class FrameTooLarge(Exception):
    """
    A frame header announced more than the allowed payload size.
    """

    def __init__(self, size, limit, payloads=()):
        Exception.__init__(self, f"frame of {size} bytes exceeds {limit}")
        self.size = size
        self.limit = limit
        #: Complete payloads that preceded the oversized frame in the same
        #: feed; they are valid and should still be delivered.
        self.payloads = list(payloads)


def frame(payload):
    """
    The bytes that carry C{payload} on the wire.

    @raise FrameTooLarge: if C{payload} cannot be described by the header.
    """
    if len(payload) > 0xFFFFFFFF:
        raise FrameTooLarge(len(payload), 0xFFFFFFFF)
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """
    Turns a stream of bytes, split anywhere, into payloads.

    The buffer never holds more than a header plus C{max_frame} bytes of the
    frame being read, so a misbehaving peer cannot grow it without bound.
    """

    def __init__(self, max_frame=DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data):
        """
        Add received bytes and return the list of completed payloads.

        @raise FrameTooLarge: as soon as a header announces an oversized
            frame, before any of its payload is buffered; the payloads
            completed before it are on the exception. The decoder is useless
            afterwards: the stream has lost its framing.
        """
        buffer = self._buffer
        buffer += data
        payloads = []
        offset = 0
        end = len(buffer)
        while end - offset >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(buffer, offset)
            if size > self.max_frame:
                self._buffer = bytearray()
                raise FrameTooLarge(size, self.max_frame, payloads)
            start = offset + HEADER_SIZE
            if end - start < size:
                break
            payloads.append(bytes(buffer[start:start + size]))
            offset = start + size
        if offset:
            del buffer[:offset]
        return payloads

    @property
    def buffered(self):
        """
        How many received bytes wait for the rest of their frame.
        """
        return len(self._buffer)
