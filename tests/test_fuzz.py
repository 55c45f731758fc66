"""
Fuzzing (hypothesis) of everything in the gate that reads what a stranger
sends: the frame decoder, the envelope parser and a session behind it, the
auth and resume tokens, the encrypted channel, and the push/admin API.

Each target has one promise, checked on every input: a defined answer
(payloads, an L{Envelope}, a player id, an opened frame, a 2xx) or the one
exception type (with a stable code) that its caller turns into the answer
PROTOCOL.md owes, never anything else, and no logged failure.
C{tests/test_properties.py} holds the first property tests of framing and
parsing; this file adds hostile inputs (splits against a reference decoder,
surrogates, huge numbers, NaN, nesting, duplicate keys, tampering).

Inputs per test are C{max_examples} times C{MMOGATE_FUZZ_SCALE} (default 1;
C{MMOGATE_FUZZ_SCALE=20 python3 -m pytest tests/test_fuzz.py} for a long
run). docs/security.md lists the counts and what a long run found.
"""

import base64
import hashlib
import hmac
import json
import os
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import \
    Ed25519PrivateKey
from hypothesis import (HealthCheck, Phase, assume, example, given,
                        settings)
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gate import errors
from gate.channel import (OVERHEAD, ChannelError, ClientHandshake,
                          GateHandshake, client_hello)
from gate.config import from_mapping
from gate.envelope import Envelope, encode, parse
from gate.errors import GateError, ProtocolViolation
from gate.framing import HEADER_SIZE, FrameDecoder, FrameTooLarge, frame
from gate.secure_tcp import GateSecureTCPFactory
from gate.tokens import RESUME_AUDIENCE, TokenError, Tokens

from tests.fakes import API_KEY, AUTH_SECRET, Stack, http_request, make_config

SCALE = float(os.environ.get("MMOGATE_FUZZ_SCALE", "1"))

#: The default C{session.max_depth}, as sessions pass it to L{parse}.
MAX_DEPTH = make_config()["session.max_depth"]


def fuzz(examples):
    """
    Hypothesis settings for C{examples} inputs (times L{SCALE}), with no
    per-input deadline: a loaded CI machine must not turn into a failure.
    """
    return settings(max_examples=max(1, int(examples * SCALE)),
                    deadline=None,
                    # Explaining a failure can take minutes; shrinking is
                    # enough to read it.
                    phases=[Phase.explicit, Phase.reuse, Phase.generate,
                            Phase.target, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


class LoggedFailures:
    """
    Collects logged failures (C{log.failure}, C{log.err}): a fuzzed input
    must never produce one, under pytest as under trial.
    """

    def __init__(self, test):
        self.events = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        if "log_failure" in event:
            self.events.append(event)

    def check(self, test, what):
        if self.events:
            failure = self.events[0]["log_failure"]
            test.fail(f"{what}: logged failure {failure.getTraceback()}")


# Hostile material shared by the targets.

#: Text with lone surrogates, controls, non-characters and astral planes.
any_text = st.text(st.characters(), max_size=24)
#: Integers from small to past Python's 4300-digit int parsing limit.
big_ints = st.one_of(
    st.integers(),
    st.integers(0, 5000).map(lambda n: 10 ** n - 1),
    st.integers(4290, 4310).map(lambda n: -10 ** n))
any_floats = st.floats(allow_nan=True, allow_infinity=True)
scalars = (st.none() | st.booleans() | big_ints | any_floats | any_text)
hostile_json = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(any_text, children, max_size=4),
    max_leaves=10)

TYPES = ["login", "auth", "resume", "req", "ack", "ping", "pong"]
FIELDS = ["t", "id", "route", "data", "token", "player_id", "resume_token",
          "last_seq", "seq", "ts"]
STABLE_CODES = {errors.BAD_JSON, errors.BAD_REQUEST, errors.UNKNOWN_TYPE}


def valid_envelope(kind, rid=1):
    """
    A well-formed client envelope of type C{kind}.
    """
    fields = {"login": {"data": {"name": "mallory"}},
              "auth": {"token": "x.y.z"},
              "resume": {"player_id": "p", "resume_token": "x.y.z",
                         "last_seq": 0},
              "req": {"route": "echo", "data": [1]},
              "ack": {"seq": 1}, "ping": {"ts": 1}, "pong": {"ts": 1}}[kind]
    env = {"t": kind, **fields}
    if kind in ("login", "auth", "resume", "req"):
        env["id"] = rid
    return env


def _edit(data, edits):
    data = bytearray(data)
    for op, position, value in edits:
        if not data:
            data.append(value)
            continue
        i = position % len(data)
        if op == 0:
            data[i] ^= 1 << (value % 8)
        elif op == 1:
            data.insert(i, value)
        elif op == 2:
            del data[i]
        else:
            data[i] = value
    return bytes(data)


edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16),
                           st.integers(0, 255)), min_size=1, max_size=6)


def mutations_of(base):
    """
    C{base} (a strategy of bytes) with a few bytes flipped, inserted,
    deleted or replaced.
    """
    return st.builds(_edit, base, edits)


valid_payloads = st.sampled_from(TYPES).map(
    lambda kind: json.dumps(valid_envelope(kind)).encode())
payloads = st.one_of(st.binary(max_size=300), mutations_of(valid_payloads),
                     valid_payloads)


def has_non_finite(value):
    if isinstance(value, float):
        return value != value or value in (float("inf"), float("-inf"))
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    return False


#: Python refuses to parse (or print) integers of more digits than this.
INT_DIGITS = 4300


def has_big_int(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) >= 10 ** INT_DIGITS
    if isinstance(value, dict):
        return any(has_big_int(v) for v in value.values())
    if isinstance(value, list):
        return any(has_big_int(v) for v in value)
    return False


def dumps(value):
    """
    JSON text as a hostile client writes it: C{NaN} and C{Infinity}
    literals, escaped lone surrogates, integers of any length.
    """
    parts = []

    def write(v):
        if v is None or isinstance(v, bool):
            parts.append({None: "null", True: "true", False: "false"}[v])
        elif isinstance(v, int):
            parts.append(_digits(v))
        elif isinstance(v, float):
            parts.append("NaN" if v != v else "Infinity" if v == _INF
                         else "-Infinity" if v == -_INF else repr(v))
        elif isinstance(v, str):
            parts.append(json.dumps(v))
        elif isinstance(v, list):
            parts.append("[")
            for i, x in enumerate(v):
                parts.append("," if i else "")
                write(x)
            parts.append("]")
        else:
            parts.append("{")
            for i, (k, x) in enumerate(v.items()):
                parts.append(("," if i else "") + json.dumps(k) + ":")
                write(x)
            parts.append("}")

    write(value)
    return "".join(parts).encode("ascii")


_INF = float("inf")


def _digits(n):
    if abs(n) < 10 ** INT_DIGITS:
        return str(n)
    # str() refuses: print in chunks of 1000 digits.
    sign, n, chunks = "-" if n < 0 else "", abs(n), []
    while n:
        n, low = divmod(n, 10 ** 1000)
        chunks.append(low)
    return sign + str(chunks[-1]) + "".join(
        str(c).zfill(1000) for c in reversed(chunks[:-1]))


class FramingFuzz(SynchronousTestCase):
    """
    L{FrameDecoder} against a reference reading of the whole stream at
    once: same payloads, C{FrameTooLarge} exactly when a header announces
    too much, never another exception, never more than one frame buffered.
    """

    @staticmethod
    def reference(stream, max_frame):
        payloads = []
        offset = 0
        while len(stream) - offset >= HEADER_SIZE:
            (size,) = struct.unpack_from(">I", stream, offset)
            if size > max_frame:
                return payloads, True
            if len(stream) - offset - HEADER_SIZE < size:
                break
            start = offset + HEADER_SIZE
            payloads.append(stream[start:start + size])
            offset = start + size
        return payloads, False

    # A stream: frames, frames with lying headers, raw bytes, in any mix.
    pieces = st.one_of(
        st.binary(max_size=200).map(frame),
        st.tuples(st.integers(0, 2 ** 32 - 1), st.binary(max_size=64)).map(
            lambda t: struct.pack(">I", t[0]) + t[1]),
        st.tuples(st.integers(0, 600), st.binary(max_size=64)).map(
            lambda t: struct.pack(">I", t[0]) + t[1]),
        st.binary(max_size=40))

    @fuzz(600)
    @given(st.lists(pieces, max_size=12).map(b"".join),
           st.integers(0, 512), st.data())
    @example(b"\x00\x00\x01\x00" + b"x" * 300, 255, None)
    def test_any_stream_any_split(self, stream, max_frame, data):
        cuts = []
        if data is not None:
            cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)),
                                             max_size=16)))
        expected, oversized = self.reference(stream, max_frame)
        decoder = FrameDecoder(max_frame)
        got = []
        raised = None
        start = 0
        for cut in cuts + [len(stream)]:
            try:
                got.extend(decoder.feed(stream[start:cut]))
            except FrameTooLarge as e:
                got.extend(e.payloads)
                raised = e
                break
            self.assertLess(decoder.buffered, HEADER_SIZE + max_frame)
            start = cut
        self.assertEqual(got, expected)
        self.assertEqual(raised is not None, oversized)
        if raised is not None:
            self.assertGreater(raised.size, max_frame)
            self.assertEqual(raised.limit, max_frame)
            self.assertEqual(decoder.buffered, 0)


class EnvelopeFuzz(SynchronousTestCase):
    """
    L{parse}: an L{Envelope} whose fields the gate can send on, or a
    L{GateError} with a stable code (a L{ProtocolViolation} only for
    C{bad_json}), and an C{id} that is an integer or C{None}.
    """

    def outcome(self, payload):
        try:
            env = parse(payload, MAX_DEPTH)
        except ProtocolViolation as e:
            self.assertEqual(e.code, errors.BAD_JSON, payload[:80])
            self.assertIsInstance(e.msg, str)
            return e
        except GateError as e:
            self.assertIn(e.code, STABLE_CODES, payload[:80])
            self.assertIsInstance(e.msg, str)
            rid = getattr(e, "id", None)
            self.assertTrue(rid is None or (type(rid) is int), rid)
            return e
        self.assertIsInstance(env, Envelope)
        self.assertIn(env.type, TYPES)
        # Whatever was accepted can be sent on: echoed in a pong, sent to
        # the backend, put in a log line.
        encode({"t": env.type, "id": env.id, **env.fields})
        return env

    @staticmethod
    def key(result):
        if isinstance(result, Envelope):
            return ("env", result.type, result.id, encode(result.fields))
        return (type(result).__name__, result.code, getattr(result, "id",
                                                            None))

    @fuzz(800)
    @given(payloads)
    @example(b'{"t":"ping","ts":"\\ud800"}')
    @example(b'{"t":"req","id":1,"route":"echo","data":"\\udfff"}')
    @example(b'{"t":"ping","ts":"\\ud83d\\ude00"}')
    def test_any_bytes(self, payload):
        self.outcome(payload)

    @fuzz(500)
    @given(st.sampled_from(TYPES), st.sampled_from(FIELDS + ["x"]),
           hostile_json)
    def test_hostile_values_in_any_field(self, kind, field, value):
        """
        NaN, Infinity, over-long integers and lone surrogates anywhere.
        """
        env = valid_envelope(kind)
        env[field] = value
        payload = dumps(env)
        result = self.outcome(payload)
        if has_non_finite(value) or has_big_int(value):
            self.assertIsInstance(result, ProtocolViolation, payload[:200])

    @fuzz(200)
    @given(st.integers(1, 3000) | st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3),
           st.sampled_from(["[", '{"a":', "mix"]),
           st.sampled_from(["top", "data"]))
    @example(100000, "[", "top")
    @example(100000, '{"a":', "data")
    def test_deep_nesting(self, depth, opener, where):
        """
        Nesting beyond C{session.max_depth} is C{bad_json}, however deep;
        up to it, it is an envelope's business.
        """
        opens = {"[": ("[", "]"), '{"a":': ('{"a":', "}")}
        if opener == "mix":
            pairs = [opens["[" if i % 2 else '{"a":'] for i in range(depth)]
        else:
            pairs = [opens[opener]] * depth
        nested = ("".join(o for o, _ in pairs) + "1"
                  + "".join(c for _, c in reversed(pairs)))
        if where == "top":
            text = nested
        else:
            text = '{"t":"req","id":7,"route":"echo","data":%s}' % nested
        result = self.outcome(text.encode())
        total = depth if where == "top" else depth + 1
        if (where == "top" and not nested.startswith("{")) or \
                total > MAX_DEPTH:
            self.assertIsInstance(result, ProtocolViolation)
        else:
            self.assertNotIsInstance(result, ProtocolViolation)

    @fuzz(300)
    @given(st.lists(st.tuples(st.sampled_from(FIELDS),
                              st.sampled_from(TYPES) | st.integers(-2, 3)
                              | st.text(max_size=3) | st.none()),
                    min_size=1, max_size=10))
    def test_duplicate_keys(self, pairs):
        """
        With a key given twice, the last one counts: exactly as if only it
        had been sent.
        """
        text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}"
                              for k, v in pairs) + "}"
        self.assertEqual(self.key(self.outcome(text.encode())),
                         self.key(self.outcome(
                             json.dumps(dict(pairs)).encode())))

    @fuzz(400)
    @given(st.sampled_from(["auth", "ack", "resume", "req"]), st.data())
    def test_wrong_field_types(self, kind, data):
        """
        A required field of the wrong kind is C{bad_request}, with the
        request's id when it has a usable one.
        """
        env = valid_envelope(kind, rid=data.draw(st.integers(0, 2 ** 40)))
        required = {"auth": ["token"], "ack": ["seq"],
                    "resume": ["player_id", "resume_token", "last_seq"],
                    "req": ["route"]}[kind]
        field = data.draw(st.sampled_from(required))
        wrong = data.draw(st.none() | st.booleans() | st.lists(st.none(),
                                                               max_size=2)
                          | st.dictionaries(st.text(max_size=2), st.none(),
                                            max_size=2)
                          | (st.integers(max_value=-1) if field in
                             ("seq", "last_seq") else st.floats(
                                 allow_nan=False, allow_infinity=False))
                          | (st.just("") if field not in ("seq", "last_seq")
                             else st.text(max_size=3)))
        env[field] = wrong
        result = self.outcome(json.dumps(env).encode())
        self.assertIsInstance(result, GateError, env)
        self.assertEqual(result.code, errors.BAD_REQUEST, env)
        self.assertEqual(getattr(result, "id", None),
                         env.get("id") if kind != "ack" else None)

    @fuzz(300)
    @given(st.sampled_from(TYPES), st.binary(min_size=1, max_size=4),
           st.integers(0, 1000))
    def test_invalid_utf8(self, kind, junk, where):
        """
        Bytes that are not UTF-8 anywhere, or surrogates encoded as if they
        were (CESU-8): C{bad_json}.
        """
        try:
            junk.decode("utf-8")
            junk = b"\xed\xa0\x80" + junk  # an encoded surrogate
        except UnicodeDecodeError:
            pass
        payload = json.dumps(valid_envelope(kind)).encode()
        i = where % len(payload)
        self.assertIsInstance(self.outcome(payload[:i] + junk + payload[i:]),
                              ProtocolViolation)


class SessionFuzz(SynchronousTestCase):
    """
    A session fed any sequence of payloads answers only envelopes of the
    contract, with stable codes; after C{bad_json} it says nothing more
    and closes; no input makes C{receive} raise or log a failure.
    """

    GATE_TYPES = {"resp", "err", "pong", "ping", "kick", "push", "gap"}

    @fuzz(200)
    @given(st.lists(st.one_of(payloads,
                              st.tuples(st.sampled_from(TYPES),
                                        st.sampled_from(FIELDS),
                                        hostile_json).map(
                                  lambda t: dumps({**valid_envelope(t[0]),
                                                   t[1]: t[2]}))),
                    max_size=8))
    @example([b'{"t":"ping","ts":"\\ud800"}', b'{"t":"ping","ts":1}'])
    def test_any_sequence(self, sequence):
        logged = LoggedFailures(self)
        stack = Stack()
        # A backend that logs in {"name": "..."} and echoes, as the
        # reference backend does; anything else is auth_failed.
        stack.backend.login = lambda session_id, data: (
            succeed((data["name"], None))
            if isinstance(data, dict) and isinstance(data.get("name"), str)
            and data["name"] else fail(GateError(errors.AUTH_FAILED, "no")))
        stack.backend.call = lambda session_id, player_id, rid, route, data: \
            succeed(data)
        session, connection = stack.connect()
        # Log in first, so bound-only paths (req, ack) are reached too.
        stack.send(session, t="login", id=0, data={"name": "fuzz"})
        connection.take()
        for payload in sequence:
            session.receive(payload)
        messages = connection.messages
        for i, message in enumerate(messages):
            self.assertIn(message["t"], self.GATE_TYPES, message)
            if message["t"] == "err":
                self.assertIn(message["code"], STABLE_CODES | {
                    errors.BUSY, errors.NOT_AUTHENTICATED, errors.AUTH_FAILED,
                    errors.RESUME_REJECTED, errors.RATE_LIMITED}, message)
                if message["code"] == errors.BAD_JSON:
                    self.assertEqual(i, len(messages) - 1)
                    self.assertTrue(connection.closed)
        session.lost()
        self.assertEqual(stack.sessions.sessions, {})
        logged.check(self, repr(sequence)[:300])


# Tokens.

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_jwt(header, claims, key=AUTH_SECRET, alg="HS256"):
    """
    A JWT built by hand, so that headers and claims may be anything JSON
    (NaN included), signed with C{alg} (an HMAC name) or unsigned.
    """
    head = b64url(dumps(header))
    body = b64url(dumps(claims) if not isinstance(claims, bytes)
                  else claims)
    signing_input = f"{head}.{body}".encode()
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384,
              "HS512": hashlib.sha512}.get(alg)
    sig = b""
    if digest is not None:
        sig = hmac.new(key.encode(), signing_input, digest).digest()
    return f"{head}.{body}.{b64url(sig)}"


NOW = 1_000_000.0


class TokenFuzz(SynchronousTestCase):
    """
    L{Tokens}: anything but a well-signed HS256 token with a non-empty
    string C{sub} and a finite, future C{exp} raises L{TokenError}, and
    nothing raises anything else.
    """

    def setUp(self):
        clock = Clock()
        clock.advance(NOW)
        self.tokens = Tokens(AUTH_SECRET, clock, resume_ttl=3600)

    def check_both(self, token, player_id="p"):
        """
        C{(auth result, resume result)}: a player id or claims, or the
        L{TokenError}.
        """
        results = []
        for check in (lambda: self.tokens.player_of_auth_token(token),
                      lambda: self.tokens.check_resume_token(token,
                                                             player_id)):
            try:
                results.append(check())
            except TokenError as e:
                results.append(e)
        return results

    @fuzz(600)
    @given(st.one_of(
        any_text,
        st.lists(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvw"
                         "xyz0123456789-_=+/ .", max_size=40),
                 min_size=1, max_size=5).map(".".join),
        st.lists(st.binary(max_size=60).map(b64url), min_size=3,
                 max_size=3).map(".".join)))
    @example("\ud800")
    @example("eyJhbGciOiJIUzI1NiJ9.\udfff.x")
    @example("..")
    def test_random_strings(self, token):
        for result in self.check_both(token):
            self.assertIsInstance(result, TokenError)

    @fuzz(500)
    @given(st.booleans(), edits)
    def test_tampered(self, resume, changes):
        """
        A valid token with bytes changed is refused, unless the change is
        invisible after base64 decoding (spare bits of the last character).
        """
        if resume:
            token = self.tokens.resume_token("alice", "ep1")
        else:
            token = sign_jwt({"alg": "HS256", "typ": "JWT"},
                             {"sub": "alice", "exp": NOW + 60})
        tampered = _edit(token.encode(), changes).decode("latin-1")
        assume(tampered != token)
        auth, resume_claims = self.check_both(tampered, "alice")
        accepted = auth if not resume else resume_claims
        if not isinstance(accepted, TokenError):
            # Only a change that decodes to the same bytes.
            self.assertEqual(self.decoded(tampered), self.decoded(token))

    @staticmethod
    def decoded(token):
        return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
                for part in token.split(".")]

    @fuzz(200)
    @given(st.sampled_from(["HS256", "none", "None", "NONE", "HS384", "HS512",
                            "RS256", "ES256", "PS256", "EdDSA", "", "hs256"])
           | st.none() | st.integers() | st.lists(st.just("HS256"),
                                                  max_size=2),
           st.sampled_from(["HS256", "HS384", "HS512", None]),
           st.sampled_from([AUTH_SECRET, "", "wrong-secret-0123456789abcdef"
                            "0123456789"]))
    def test_algorithms(self, alg, signed_with, key):
        """
        Only HS256 with the gate's secret: C{none}, other algorithms, a
        signature by another algorithm or key, a missing one: refused.
        """
        token = sign_jwt({"alg": alg, "typ": "JWT"},
                         {"sub": "alice", "exp": NOW + 60,
                          "aud": RESUME_AUDIENCE}, key=key, alg=signed_with)
        auth, resume = self.check_both(token, "alice")
        if alg == "HS256" and signed_with == "HS256" and key == AUTH_SECRET:
            self.assertIsInstance(auth, TokenError)  # a resume audience
            self.assertEqual(resume["sub"], "alice")
        else:
            self.assertIsInstance(auth, TokenError)
            self.assertIsInstance(resume, TokenError)

    MISSING = object()
    claim_values = st.sampled_from([MISSING]) | scalars | st.lists(
        scalars, max_size=2) | st.dictionaries(any_text, scalars, max_size=2)

    @fuzz(500)
    @given(st.fixed_dictionaries({
        "sub": st.sampled_from([MISSING, "", "alice"]) | claim_values,
        "exp": st.sampled_from([MISSING, NOW - 1, NOW, NOW + 0.5, NOW + 60,
                                float("nan"), float("inf"), -float("inf"),
                                True, "9999999999", 10 ** 30]) | claim_values,
        "aud": st.sampled_from([MISSING, RESUME_AUDIENCE, [RESUME_AUDIENCE],
                                [RESUME_AUDIENCE, 5], "game"]) | claim_values,
        "ep": claim_values,
        "iat": claim_values, "nbf": claim_values}))
    @example({"sub": "alice", "exp": float("nan"), "aud": MISSING,
              "ep": MISSING, "iat": MISSING, "nbf": MISSING})
    @example({"sub": "alice", "exp": float("inf"), "aud": RESUME_AUDIENCE,
              "ep": MISSING, "iat": MISSING, "nbf": MISSING})
    def test_claims(self, claims):
        """
        Well signed, any claims: accepted only with a non-empty string
        C{sub} and a finite C{exp} after now (a resume token only with the
        resume audience); a minimal valid auth token is accepted.
        """
        claims = {k: v for k, v in claims.items() if v is not self.MISSING}
        try:
            token = sign_jwt({"alg": "HS256", "typ": "JWT"}, claims)
        except (ValueError, RecursionError):
            assume(False)
        sub, exp, aud = claims.get("sub"), claims.get("exp"), \
            claims.get("aud")
        good_sub = isinstance(sub, str) and sub != ""
        good_exp = (type(exp) in (int, float) and exp == exp
                    and exp not in (float("inf"),) and exp > NOW)
        player = sub if isinstance(sub, str) else "p"
        auth, resume = self.check_both(token, player)
        if not isinstance(auth, TokenError):
            self.assertTrue(good_sub and good_exp, claims)
            self.assertEqual(auth, sub)
            self.assertNotEqual(aud, RESUME_AUDIENCE)
        elif good_sub and good_exp and "aud" not in claims \
                and set(claims) <= {"sub", "exp"}:
            self.fail(f"valid auth token refused: {claims}: {auth}")
        if not isinstance(resume, TokenError):
            self.assertTrue(good_sub and good_exp, claims)
            self.assertTrue(aud == RESUME_AUDIENCE or
                            (isinstance(aud, list) and RESUME_AUDIENCE in aud),
                            claims)

    @fuzz(20)
    @given(st.integers(10_000, 300_000), st.sampled_from(["A", ".", "é"]))
    def test_huge_tokens(self, size, filler):
        head = sign_jwt({"alg": "HS256"}, {"sub": "a", "exp": NOW + 9})
        for token in (filler * size, head + filler * size,
                      sign_jwt({"alg": "HS256"},
                               {"sub": "a" * size, "exp": NOW + 9})[:-3]):
            for result in self.check_both(token, "a"):
                self.assertIsInstance(result, TokenError)


# The encrypted channel.

GATE_KEY = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)


def established():
    """
    C{(client channel, gate channel, gate hello)} after a real handshake.
    """
    client = ClientHandshake()
    reply, gate = GateHandshake(GATE_KEY).receive(client.hello())
    return client.receive(reply), gate, reply


# What an attacker on the wire does to a stream of sealed frames.
ATTACKS = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16),
              st.integers(0, 7)),
    st.tuples(st.just("drop"), st.integers(0, 1 << 16)),
    st.tuples(st.just("replay"), st.integers(0, 1 << 16)),
    st.tuples(st.just("swap"), st.integers(0, 1 << 16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16),
              st.integers(0, 100)),
    st.tuples(st.just("forge"), st.integers(0, 1 << 16),
              st.binary(max_size=80)),
    st.tuples(st.just("counter"), st.integers(0, 1 << 16),
              st.integers(0, 2 ** 64 - 1))), max_size=3)

def attack(frames, steps):
    """
    C{frames} after an attacker on the wire flipped bits, dropped,
    replayed, swapped, truncated, forged or renumbered some.
    """
    frames = list(frames)
    for step in steps:
        if not frames and step[0] != "forge":
            continue
        i = step[1] % max(1, len(frames))
        kind = step[0]
        if kind == "flip" and frames[i]:
            f = bytearray(frames[i])
            f[step[1] % len(f)] ^= 1 << step[2]
            frames[i] = bytes(f)
        elif kind == "drop":
            del frames[i]
        elif kind == "replay":
            frames.insert(i + 1, frames[i])
        elif kind == "swap" and i + 1 < len(frames):
            frames[i], frames[i + 1] = frames[i + 1], frames[i]
        elif kind == "truncate":
            frames[i] = frames[i][:step[2]]
        elif kind == "forge":
            frames.insert(i, step[2])
        elif kind == "counter":
            frames[i] = struct.pack(">Q", step[2]) + frames[i][8:]
    return frames


class ChannelFuzz(SynchronousTestCase):
    """
    L{gate.channel}: hellos and sealed frames that are random, tampered,
    replayed, reordered, dropped or truncated give L{ChannelError} and
    nothing else; the frames before the first bad one open unchanged.
    """

    def hello_outcome(self, payload):
        try:
            return GateHandshake(GATE_KEY).receive(payload)
        except ChannelError as e:
            return e

    @fuzz(500)
    @given(st.one_of(
        st.binary(max_size=200),
        mutations_of(st.binary(min_size=32, max_size=32).map(client_hello)),
        st.fixed_dictionaries({}, optional={
            "t": st.sampled_from(["hello", "rekey"]) | scalars,
            "v": st.sampled_from([1, 1.0, True, "1", 2]) | scalars,
            "pub": st.binary(max_size=40).map(
                lambda b: base64.b64encode(b).decode()) | scalars}).map(
                    dumps)))
    @example(client_hello(b"\x00" * 32))  # a low-order point
    @example(b'{"t":"hello","v":1,"pub":"\\ud800"}')
    def test_gate_reads_any_hello(self, payload):
        result = self.hello_outcome(payload)
        if not isinstance(result, ChannelError):
            obj = json.loads(payload)
            self.assertEqual((obj["t"], obj["v"], type(obj["v"])),
                             ("hello", 1, int))
            self.assertEqual(len(base64.b64decode(obj["pub"],
                                                  validate=True)), 32)

    @fuzz(300)
    @given(edits, st.booleans())
    def test_client_reads_tampered_gate_hello(self, changes, pinned):
        """
        A gate hello with anything changed (its key, its ephemeral key, its
        signature, its JSON) is refused, pinned or not.
        """
        client = ClientHandshake(
            pinned_key=GATE_KEY.public_key().public_bytes_raw()
            if pinned else None)
        reply, _ = GateHandshake(GATE_KEY).receive(client.hello())
        tampered = _edit(reply, changes)
        try:
            obj, original = json.loads(tampered), json.loads(reply)
            same = all(base64.b64decode(obj[k], validate=True)
                       == base64.b64decode(original[k]) for k in
                       ("pub", "key", "sig")) and obj.get("v") == 1 \
                and type(obj.get("v")) is int and obj.get("t") == "hello"
        except Exception:
            same = False
        try:
            client.receive(tampered)
        except ChannelError:
            return
        # Accepted: only a change that leaves every value as it was
        # (whitespace, say).
        self.assertTrue(same, tampered)

    @fuzz(500)
    @given(st.lists(st.binary(max_size=64).filter(lambda m: b"rekey" not in m)
                    | st.just(None), max_size=8),
           ATTACKS)
    def test_tampered_stream(self, messages, steps):
        client, gate, _ = established()
        # None stands for a client key rotation in the stream.
        genuine = [client.rekey() if m is None else client.seal(m)
                   for m in messages]
        plain = [None if m is None else m for m in messages]
        delivered = attack(genuine, steps)
        for i, sealed in enumerate(delivered):
            try:
                opened = gate.open(sealed)
            except ChannelError:
                # The first frame that is not the genuine one, and only it.
                self.assertTrue(i >= len(genuine) or sealed != genuine[i],
                                (i, steps))
                self.assertEqual(delivered[:i], genuine[:i])
                return
            self.assertLess(i, len(genuine), steps)
            self.assertEqual(sealed, genuine[i], steps)
            self.assertEqual(opened, plain[i])


class SecureListenerFuzz(SynchronousTestCase):
    """
    The encrypted-channel protocol (L{gate.secure_tcp}) fed random or
    tampered bytes: it closes without writing a byte more, and the
    session (if the handshake made one) goes.
    """

    def connect(self, stack):
        factory = GateSecureTCPFactory(stack.sessions, 1024, stack.clock,
                                       GATE_KEY, handshake_timeout=5.0)
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1))
        transport = StringTransport(
            peerAddress=IPv4Address("TCP", "10.0.0.9", 1))
        protocol.makeConnection(transport)
        return protocol, transport

    def drop(self, stack, protocol, baseline):
        """
        The connection goes: no session and no timer of it is left.
        """
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(stack.sessions.sessions, {})
        self.assertEqual(len(stack.clock.getDelayedCalls()), baseline)

    @fuzz(200)
    @given(st.binary(max_size=300) | mutations_of(
        st.binary(min_size=32, max_size=32).map(lambda k: frame(
            client_hello(k)))))
    def test_before_handshake(self, data):
        logged = LoggedFailures(self)
        stack = Stack()
        baseline = len(stack.clock.getDelayedCalls())
        protocol, transport = self.connect(stack)
        protocol.dataReceived(data)
        if protocol.channel is None:
            self.assertEqual(transport.value(), b"")
            self.assertEqual(stack.sessions.sessions, {})
            # Nothing usable yet: closed now, or at the handshake timeout.
            stack.clock.advance(5.0)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(transport.value(), b"")
        self.drop(stack, protocol, baseline)
        logged.check(self, repr(data))

    @fuzz(200)
    @given(st.integers(0, 5), ATTACKS, st.binary(max_size=60))
    def test_after_handshake(self, count, steps, tail):
        """
        Pings sealed by a real client, attacked on the way; then random
        bytes. Every genuine frame before the first bad one is answered,
        nothing after it.
        """
        logged = LoggedFailures(self)
        stack = Stack()
        baseline = len(stack.clock.getDelayedCalls())
        protocol, transport = self.connect(stack)
        client = ClientHandshake()
        protocol.dataReceived(frame(client.hello()))
        decoder = FrameDecoder(1 << 20)
        channel = client.receive(decoder.feed(transport.value())[0])
        transport.clear()
        genuine = [channel.seal(json.dumps({"t": "ping", "ts": i}).encode())
                   for i in range(count)]
        delivered = attack(genuine, steps)
        protocol.dataReceived(b"".join(frame(f) for f in delivered) + tail)
        good = 0
        while good < len(delivered) and good < len(genuine) and \
                delivered[good] == genuine[good]:
            good += 1
        answers = [json.loads(channel.open(p))
                   for p in decoder.feed(transport.value())]
        expected = [{"t": "pong", "ts": i} for i in range(good)]
        if good < len(delivered):
            # A frame that is not the genuine next one: not a word more.
            self.assertTrue(transport.disconnecting)
        else:
            frames, oversized = FramingFuzz.reference(tail, 1024 + OVERHEAD)
            if frames:
                # Random bytes never authenticate.
                self.assertTrue(transport.disconnecting)
            elif oversized:
                # Sealed still: a frame too large is answered as on TCP.
                self.assertEqual([a["code"] for a in answers[good:]],
                                 ["frame_too_large"])
                answers = answers[:good]
                self.assertTrue(transport.disconnecting)
            else:
                self.assertFalse(transport.disconnecting)
        self.assertEqual(answers, expected)
        self.drop(stack, protocol, baseline)
        logged.check(self, repr((count, steps, tail)))


# The push and admin API.

API_CALLS = {
    "push": ["players", "route", "data", "persist"],
    "broadcast": ["route", "data"],
    "batch": ["ops"],
    "kick": ["player_id", "reason", "ban_seconds"],
    "reconnect": ["player_id", "all", "addr"],
    "drain": ["addr", "deadline"],
}
API_VALID = {
    "push": {"players": ["alice"], "route": "news", "data": 1},
    "broadcast": {"route": "news", "data": 1},
    "batch": {"ops": [{"players": ["alice"], "route": "news"}]},
    "kick": {"player_id": "alice", "reason": "x"},
    "reconnect": {"player_id": "alice", "addr": "127.0.0.1:1"},
    "drain": {"addr": "127.0.0.1:1", "deadline": 30},
}


def make_gate():
    """
    A whole L{GateService}, started on a L{MemoryReactorClock} (its
    listeners bound to nothing): its API answers every call through the
    real objects, in memory.
    """
    from gate.service import GateService
    config = from_mapping({"gate": {"id": "fuzz"}, "api": {"key": API_KEY},
                           "auth": {"secret": AUTH_SECRET},
                           "backend": {"url": "http://backend.invalid",
                                       "register_interval": 0.0}},
                          from_file=True)
    reactor = MemoryReactorClock()
    gate = GateService(config, reactor)
    gate.startService()
    return gate, gate.listeners["api"].factory, reactor


def api_bodies(call):
    fields = API_CALLS[call]
    shaped = st.dictionaries(st.sampled_from(fields + ["x"]), hostile_json,
                             max_size=len(fields) + 1)
    near_valid = st.tuples(st.sampled_from(fields), hostile_json).map(
        lambda t: {**API_VALID[call], t[0]: t[1]})
    return st.one_of(shaped.map(dumps), near_valid.map(dumps),
                     hostile_json.map(dumps), st.binary(max_size=200),
                     mutations_of(st.just(json.dumps(API_VALID[call])
                                          .encode())))


class APIFuzz(SynchronousTestCase):
    """
    Every POST call of the API, any body: 200 with a JSON object, or 400
    C{bad_request} with a message (404 for a call this gate does not serve
    yet, whatever the body); never a 5xx, never a logged failure.
    """

    def check_call(self, call, bodies, examples=()):
        gates = [make_gate()]
        logged = LoggedFailures(self)
        gate, site, reactor = gates[-1]
        status, _, raw = http_request(
            site, "POST", f"/v1/{call}", json.dumps(API_VALID[call]).encode(),
            {"Authorization": "Bearer " + API_KEY}, clock=reactor)
        served = status != 404

        def run(body):
            if not gates[-1][0].sessions.accepting:
                gates.append(make_gate())  # the last body drained it
            gate, site, reactor = gates[-1]
            status, headers, raw = http_request(
                site, "POST", f"/v1/{call}", body,
                {"Authorization": "Bearer " + API_KEY}, clock=reactor)
            answer = json.loads(raw)
            self.assertEqual(headers["content-type"], "application/json")
            if not served:
                self.assertEqual((status, answer["error"]["code"]),
                                 (404, "not_found"))
            elif status == 400:
                self.assertEqual(answer["error"]["code"], "bad_request")
                self.assertIsInstance(answer["error"]["msg"], str)
            else:
                self.assertEqual(status, 200, raw[:300])
                self.assertIsInstance(answer, dict)
            reactor.advance(0)
            logged.check(self, repr(body)[:300])

        test = given(bodies)(run)
        for body in examples:
            test = example(body)(test)
        fuzz(150)(test)()
        return served

    def test_push(self):
        self.assertTrue(self.check_call("push", api_bodies("push"), [
            b'{"players":["a"],"route":"r","data":"\\ud800"}',
            b'{"players":["\\udfff"],"route":"r"}']))

    def test_broadcast(self):
        self.assertTrue(self.check_call("broadcast", api_bodies("broadcast")))

    def test_batch(self):
        ops = st.lists(st.dictionaries(
            st.sampled_from(API_CALLS["push"]), hostile_json, max_size=4)
            | hostile_json, max_size=4).map(lambda ops: dumps({"ops": ops}))
        self.assertTrue(self.check_call("batch", st.one_of(
            api_bodies("batch"), ops)))

    def test_kick(self):
        self.assertTrue(self.check_call("kick", api_bodies("kick"), [
            dumps({"player_id": "alice", "ban_seconds": 10 ** 400}),
            dumps({"player_id": "alice", "ban_seconds": float("nan")})]))

    def test_reconnect(self):
        self.check_call("reconnect", api_bodies("reconnect"))

    def test_drain(self):
        self.check_call("drain", api_bodies("drain"), [
            dumps({"addr": "127.0.0.1:1", "deadline": -10 ** 5000}),
            dumps({"addr": "127.0.0.1:1", "deadline": 10 ** 400})])
