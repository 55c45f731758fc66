"""
The TCP transport's framing: a 4-byte unsigned big-endian length, then that
many bytes of payload (PROTOCOL.md section 1).

Kept apart from any protocol class so it can be tested byte by byte, and
shared by the gate, the Python client and the encrypted channel, which all
frame the same way.
"""

import struct

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
MAX_HEADER_SIZE = 0xFFFFFFFF


class FrameTooLarge(Exception):
    """
    A frame header announced more than the allowed payload size.
    """

    def __init__(self, size, limit, payloads=()):
        Exception.__init__(self, f"frame of {size} bytes exceeds {limit}")
        self.size = size
        self.limit = limit
        #: Complete payloads that preceded the oversized frame in the same
        #: feed: valid, and still to be delivered.
        self.payloads = list(payloads)


def frame(payload):
    """
    The bytes that carry C{payload} on the wire.

    @raise FrameTooLarge: if C{payload} cannot be described by the header.
    """
    if len(payload) > MAX_HEADER_SIZE:
        raise FrameTooLarge(len(payload), MAX_HEADER_SIZE)
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """
    Turns a stream of bytes, split anywhere, into payloads.

    The buffer never holds more than one frame header plus C{max_frame} bytes
    of the frame being read, so a peer cannot grow it without bound.
    """

    def __init__(self, max_frame):
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data):
        """
        Add received bytes; return the list of complete payloads.

        @raise FrameTooLarge: as soon as a header announces an oversized frame,
            before its payload is buffered; the payloads completed before it
            are on the exception. The stream has lost its framing then.
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
