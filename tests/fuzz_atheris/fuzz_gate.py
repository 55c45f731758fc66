#!/usr/bin/env python3
"""
Coverage-guided fuzzing (atheris, libFuzzer) of what the gate reads from
strangers. Not part of the test suite (neither pytest nor trial collects
this directory); the hypothesis suite is tests/test_fuzz.py.

    python3 -m pip install atheris
    python3 tests/fuzz_atheris/fuzz_gate.py TARGET -max_total_time=60 \
        --seeds /tmp/corpus-TARGET -dict=tests/fuzz_atheris/json.dict

TARGET is one of: framing, envelope, session, tokens, hello, sealed, api.
Each input must give the target's defined answer or its one exception
(FrameTooLarge, GateError, TokenError, ChannelError, an HTTP 4xx); anything
else is a crash: libFuzzer stops and writes the input to crash-<sha1>,
which replays with `fuzz_gate.py TARGET crash-<sha1>`. C{--seeds DIR}
writes well-formed inputs (envelopes, tokens, hellos, API bodies) to DIR
and fuzzes from there: libFuzzer cannot see inside the C JSON parser, so
it needs them (and json.dict) to get past it. Figures of a run are in
docs/security.md.
"""

import json
import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", ".."))

# Coverage is traced in the gate's own modules only: imported first, here.
with atheris.instrument_imports(include=["gate", "mmogate_plugins",
                                         "backend"]):
    import gate.service  # noqa: F401 (everything the API reaches)
    from gate.channel import ChannelError, GateHandshake, SecureChannel
    from gate.envelope import Envelope, encode, parse
    from gate.errors import GateError
    from gate.framing import FrameDecoder, FrameTooLarge
    from gate.tokens import TokenError, Tokens

from cryptography.hazmat.primitives.asymmetric.ed25519 import \
    Ed25519PrivateKey  # noqa: E402
from twisted.internet.defer import fail, succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.logger import globalLogPublisher  # noqa: E402

from tests.fakes import API_KEY, AUTH_SECRET, Stack, http_request  # noqa
from tests.test_fuzz import make_gate  # noqa: E402

GATE_TYPES = {"resp", "err", "pong", "ping", "kick", "push", "gap"}


def framing(data):
    fdp = atheris.FuzzedDataProvider(data)
    decoder = FrameDecoder(fdp.ConsumeIntInRange(0, 1024))
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
        try:
            for payload in decoder.feed(chunk):
                assert len(payload) <= decoder.max_frame
        except FrameTooLarge:
            return
        assert decoder.buffered < 4 + decoder.max_frame


def envelope(data):
    try:
        env = parse(data, 32)
    except GateError:
        return
    assert isinstance(env, Envelope)
    encode({"t": env.type, "id": env.id, **env.fields})


_failures = []
globalLogPublisher.addObserver(
    lambda event: event.get("log_failure") and _failures.append(event))


def session(data):
    """
    Payloads separated by newlines, to a session whose backend logs in
    {"name": ...} and echoes (tests.test_fuzz.SessionFuzz's).
    """
    stack = Stack()
    stack.backend.login = lambda session_id, data: (
        succeed((data["name"], None))
        if isinstance(data, dict) and isinstance(data.get("name"), str)
        and data["name"] else fail(GateError("auth_failed", "no")))
    stack.backend.call = lambda *args: succeed(args[-1])
    s, connection = stack.connect()
    for payload in data.split(b"\n"):
        s.receive(payload)
    for message in connection.messages:
        assert message["t"] in GATE_TYPES, message
    s.lost()
    assert not stack.sessions.sessions
    if _failures:
        raise AssertionError(_failures[0]["log_failure"].getTraceback())


_clock = Clock()
_clock.advance(1_000_000)
_tokens = Tokens(AUTH_SECRET, _clock, 3600)


def tokens(data):
    token = atheris.FuzzedDataProvider(data).ConsumeUnicode(len(data))
    for check in (lambda: _tokens.player_of_auth_token(token),
                  lambda: _tokens.check_resume_token(token, "p")):
        try:
            check()
        except TokenError:
            pass


_key = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)


def hello(data):
    try:
        GateHandshake(_key).receive(data)
    except ChannelError:
        pass


def sealed(data):
    channel = SecureChannel(send_key=b"\x01" * 32, recv_key=b"\x02" * 32)
    for frame in data.split(b"\xff\xfe"):
        try:
            channel.open(frame)
        except ChannelError:
            return


_api = None
CALLS = ["push", "broadcast", "batch", "kick", "reconnect", "drain"]


def api(data):
    global _api
    if _api is None or not _api[0].sessions.accepting:
        _api = make_gate()
    _, site, reactor = _api
    call = CALLS[data[0] % len(CALLS)] if data else "push"
    status, headers, raw = http_request(
        site, "POST", f"/v1/{call}", data[1:],
        {"Authorization": "Bearer " + API_KEY}, clock=reactor)
    assert status in (200, 400, 404, 413), (status, raw)
    json.loads(raw)
    reactor.advance(0)
    if _failures:
        raise AssertionError(_failures[0]["log_failure"].getTraceback())


TARGETS = {f.__name__: f for f in (framing, envelope, session, tokens, hello,
                                   sealed, api)}

def seeds():
    """
    Well-formed inputs to start from.
    """
    import jwt
    envelopes = [{"t": "login", "id": 1, "data": {"name": "a"}},
                 {"t": "auth", "id": 2, "token": "x.y.z"},
                 {"t": "resume", "id": 3, "player_id": "a",
                  "resume_token": "x.y.z", "last_seq": 0},
                 {"t": "req", "id": 4, "route": "echo", "data": [1, "x"]},
                 {"t": "ack", "seq": 1}, {"t": "ping", "ts": 1.5},
                 {"t": "pong"}]
    out = [json.dumps(e).encode() for e in envelopes]
    out.append(b"\n".join(out))
    out.append(jwt.encode({"sub": "p", "exp": 2_000_000}, AUTH_SECRET,
                          algorithm="HS256").encode())
    out.append(_tokens.resume_token("p", "e").encode())
    out.append(b'{"t":"hello","v":1,"pub":"' + b"A" * 43 + b'="}')
    for i, body in enumerate([{"players": ["a"], "route": "r", "data": 1},
                              {"route": "r", "data": None},
                              {"ops": [{"players": ["a"], "route": "r"}]},
                              {"player_id": "a", "ban_seconds": 5},
                              {"all": True, "addr": "127.0.0.1:1"},
                              {"addr": "h:1", "deadline": 3}]):
        out.append(bytes([i]) + json.dumps(body).encode())
    return out


if __name__ == "__main__":
    if "--seeds" in sys.argv:
        i = sys.argv.index("--seeds")
        directory = sys.argv[i + 1]
        os.makedirs(directory, exist_ok=True)
        for n, seed in enumerate(seeds()):
            with open(os.path.join(directory, f"seed-{n}"), "wb") as f:
                f.write(seed)
        sys.argv[i:i + 2] = [directory]
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} "
                 f"[libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
