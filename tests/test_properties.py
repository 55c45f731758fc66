"""
Property tests (hypothesis) of what parses client input: whatever arrives,
the gate answers with a defined outcome and never anything else.
"""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gate.envelope import Envelope, parse
from gate.errors import GateError
from gate.framing import FrameDecoder, FrameTooLarge, frame

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)

envelope_like = st.dictionaries(
    st.sampled_from(["t", "id", "route", "data", "token", "player_id",
                     "resume_token", "last_seq", "seq", "ts"]),
    json_values | st.sampled_from(["login", "auth", "resume", "req", "ack",
                                   "ping", "pong", "push"]),
    max_size=6)


class FramingProperties(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=300), max_size=8), st.data())
    def test_any_split_gives_the_payloads(self, payloads, data):
        """
        However the stream of frames is split, the decoder gives back the
        payloads, in order, and holds no more than one frame.
        """
        stream = b"".join(frame(p) for p in payloads)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)),
                                         max_size=10)))
        decoder = FrameDecoder(300)
        got = []
        start = 0
        for cut in cuts + [len(stream)]:
            got.extend(decoder.feed(stream[start:cut]))
            self.assertLessEqual(decoder.buffered, 304)
            start = cut
        self.assertEqual(got, payloads)
        self.assertEqual(decoder.buffered, 0)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=2000))
    def test_garbage_is_payloads_or_too_large(self, data):
        decoder = FrameDecoder(64)
        try:
            for payload in decoder.feed(data):
                self.assertLessEqual(len(payload), 64)
        except FrameTooLarge as e:
            self.assertGreater(e.size, 64)
        self.assertLessEqual(decoder.buffered, 68)


class EnvelopeProperties(SynchronousTestCase):
    def outcome(self, payload):
        try:
            return parse(payload)
        except GateError as e:
            self.assertIn(e.code, ("bad_json", "bad_request", "unknown_type"))
            return e

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_any_bytes(self, payload):
        self.outcome(payload)

    @settings(max_examples=500, deadline=None)
    @given(envelope_like)
    def test_any_object(self, obj):
        """
        Any JSON object is an envelope or a C{GateError} with the code owed;
        an accepted request carries an integer id.
        """
        result = self.outcome(json.dumps(obj).encode("utf-8"))
        if isinstance(result, Envelope) and result.type in ("login", "auth",
                                                            "resume", "req"):
            self.assertIsInstance(result.id, int)
            self.assertNotIsInstance(result.id, bool)
