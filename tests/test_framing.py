"""
Tests for L{gate.framing}: the 4-byte length framing of PROTOCOL.md
section 1.
"""

import struct

from twisted.trial.unittest import SynchronousTestCase

from gate.framing import HEADER_SIZE, FrameDecoder, FrameTooLarge, frame

PAYLOADS = [b'{"t":"ping"}', b"", b"x" * 300, b'{"t":"req","id":1}', b"\x00\xff"]


class FrameTests(SynchronousTestCase):
    def test_header(self):
        """
        A frame is the payload's length as 4 unsigned big-endian bytes, then
        the payload.
        """
        self.assertEqual(HEADER_SIZE, 4)
        self.assertEqual(frame(b"abc"), b"\x00\x00\x00\x03abc")
        self.assertEqual(frame(b""), b"\x00\x00\x00\x00")
        self.assertEqual(frame(b"y" * 0x01020304)[:4], b"\x01\x02\x03\x04")

    def test_round_trip(self):
        decoder = FrameDecoder(1000)
        self.assertEqual(decoder.feed(frame(b"hello")), [b"hello"])
        self.assertEqual(decoder.buffered, 0)


class DecoderSplitTests(SynchronousTestCase):
    """
    A stream of several frames decodes the same however it is split.
    """

    stream = b"".join(frame(p) for p in PAYLOADS)

    def test_split_at_every_boundary(self):
        """
        Cut once at every byte position: the two halves give every payload,
        in order.
        """
        for cut in range(len(self.stream) + 1):
            decoder = FrameDecoder(1000)
            got = decoder.feed(self.stream[:cut])
            got += decoder.feed(self.stream[cut:])
            self.assertEqual(got, PAYLOADS, f"cut at {cut}")
            self.assertEqual(decoder.buffered, 0)

    def test_split_twice_at_every_pair_of_boundaries(self):
        """
        Cut twice, at every pair of positions.
        """
        n = len(self.stream)
        for first in range(0, n + 1, 3):
            for second in range(first, n + 1, 7):
                decoder = FrameDecoder(1000)
                got = decoder.feed(self.stream[:first])
                got += decoder.feed(self.stream[first:second])
                got += decoder.feed(self.stream[second:])
                self.assertEqual(got, PAYLOADS, f"cuts at {first}, {second}")

    def test_one_byte_at_a_time(self):
        """
        Fed byte by byte, each payload comes out exactly when its last byte
        arrives, and not before.
        """
        decoder = FrameDecoder(1000)
        ends = []
        offset = 0
        for p in PAYLOADS:
            offset += HEADER_SIZE + len(p)
            ends.append(offset)
        got = []
        for i in range(len(self.stream)):
            out = decoder.feed(self.stream[i:i + 1])
            if i + 1 in ends:
                self.assertEqual(out, [PAYLOADS[ends.index(i + 1)]], i)
            else:
                self.assertEqual(out, [], i)
            got += out
        self.assertEqual(got, PAYLOADS)

    def test_empty_feed(self):
        decoder = FrameDecoder(1000)
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.feed(b"\x00\x00"), [])
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.buffered, 2)
        self.assertEqual(decoder.feed(b"\x00\x01z"), [b"z"])


class DecoderLimitTests(SynchronousTestCase):
    def test_exact_limit(self):
        """
        A payload of exactly C{max_frame} bytes is accepted.
        """
        decoder = FrameDecoder(16)
        self.assertEqual(decoder.feed(frame(b"a" * 16)), [b"a" * 16])

    def test_limit_plus_one(self):
        """
        A header announcing C{max_frame + 1} bytes raises L{FrameTooLarge}
        carrying the size and the limit.
        """
        decoder = FrameDecoder(16)
        e = self.assertRaises(FrameTooLarge, decoder.feed, frame(b"a" * 17))
        self.assertEqual((e.size, e.limit), (17, 16))

    def test_rejected_on_header_alone(self):
        """
        The oversized frame is refused as soon as its header is complete,
        before any of its payload arrives, and nothing is kept.
        """
        decoder = FrameDecoder(65536)
        self.assertEqual(decoder.feed(b"\xff\xff"), [])
        e = self.assertRaises(FrameTooLarge, decoder.feed, b"\xff\xff")
        self.assertEqual(e.size, 0xFFFFFFFF)
        self.assertEqual(decoder.buffered, 0)

    def test_oversized_after_good_frames(self):
        """
        An oversized header after good frames in the same chunk is still
        refused.
        """
        decoder = FrameDecoder(16)
        self.assertRaises(FrameTooLarge, decoder.feed,
                          frame(b"ok") + struct.pack(">I", 17))


class DecoderBoundTests(SynchronousTestCase):
    def test_buffer_bounded_by_one_frame(self):
        """
        While a maximal frame arrives, the buffer holds at most its header
        and payload; once complete it is emptied.
        """
        limit = 1024
        decoder = FrameDecoder(limit)
        data = frame(b"b" * limit)
        peak = 0
        for i in range(0, len(data), 100):
            out = decoder.feed(data[i:i + 100])
            peak = max(peak, decoder.buffered)
            self.assertLessEqual(decoder.buffered, HEADER_SIZE + limit)
        self.assertEqual(out, [b"b" * limit])
        self.assertEqual(peak, HEADER_SIZE + limit - (len(data) % 100 or 100))
        self.assertEqual(decoder.buffered, 0)

    def test_leftover_is_partial_frame_only(self):
        """
        After many complete frames and a partial one in one chunk, only the
        partial frame stays buffered.
        """
        decoder = FrameDecoder(64)
        chunk = frame(b"x" * 64) * 50 + frame(b"y" * 10)[:7]
        out = decoder.feed(chunk)
        self.assertEqual(out, [b"x" * 64] * 50)
        self.assertEqual(decoder.buffered, 7)
        self.assertEqual(decoder.feed(frame(b"y" * 10)[7:]), [b"y" * 10])
        self.assertEqual(decoder.buffered, 0)
