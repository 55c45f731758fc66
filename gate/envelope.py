"""
Client envelopes (PROTOCOL.md section 2): checking what clients send and
encoding what the gate sends.

Parsing is strict and total: any payload either becomes an L{Envelope} or
raises L{GateError} with the code the client is owed, never anything else.
"""

import json
import re

from gate import errors
from gate.errors import GateError, ProtocolViolation
from gate.framing import frame

_ROUTE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}\Z")


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    value = float(text)
    if value in (_INF, -_INF):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


_INF = float("inf")
_decoder = json.JSONDecoder(parse_constant=_reject_constant,
                            parse_float=_finite_float)
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)


def loads(data):
    """
    Strict JSON: UTF-8 only, no NaN or Infinity (which could not be sent on).

    @raise ValueError: for anything else (UnicodeDecodeError included).
    """
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8")
    obj = _decoder.decode(data)
    if ("\\ud" in data or "\\uD" in data) and _lone_surrogate(obj):
        raise ValueError("a \\ud800-\\udfff escape without its pair is not "
                         "text")
    return obj


def _lone_surrogate(obj):
    """
    Whether C{obj} holds a lone surrogate (JSON C{"\\ud800"} decodes to
    one): it has no UTF-8 form, so could not be sent on. Only called when
    the text has such an escape, for the cost of one encoding.
    """
    try:
        _encoder.encode(obj).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return True
    return False


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def too_deep(data, max_depth):
    """
    Whether the valid JSON C{data} (UTF-8 bytes, already decoded once)
    nests arrays and objects more than C{max_depth} levels (C{{}} is 1).

    Linear and in C where it counts: a payload with no more than
    C{max_depth} brackets at all is passed at once; otherwise strings are
    cut out, the brackets kept, and innermost pairs removed once per level,
    at most C{max_depth} times. Only for input that decoded: on broken
    strings the string pattern would be quadratic.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    nesting = _STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not nesting:
            return False
        nesting = nesting.replace(b"[]", b"")
    return bool(nesting)


def encode(obj):
    """
    Compact UTF-8 JSON bytes of C{obj}.
    """
    return _encoder.encode(obj).encode("utf-8")


def valid_route(route):
    """
    Whether C{route} may name a backend route: it becomes part of a URL path.
    """
    return (isinstance(route, str) and _ROUTE.match(route) is not None
            and ".." not in route)


class Envelope:
    """
    A checked client envelope: C{type} and C{id} plus the type's fields.
    """

    __slots__ = ("type", "id", "fields")

    def __init__(self, type, id, fields):
        self.type = type
        self.id = id
        self.fields = fields

    def __getitem__(self, name):
        return self.fields[name]

    def get(self, name, default=None):
        return self.fields.get(name, default)

    def __repr__(self):
        return f"Envelope({self.type!r}, {self.id!r}, {self.fields!r})"


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _need(obj, name, check, what, rid):
    value = obj.get(name)
    if name not in obj or not check(value):
        raise _BadRequest(rid, f"'{name}' must be {what}")
    return value


class _BadRequest(GateError):
    def __init__(self, rid, msg):
        GateError.__init__(self, errors.BAD_REQUEST, msg)
        self.id = rid


#: Types that carry a client-chosen request id and expect resp or err.
REQUEST_TYPES = frozenset({"login", "auth", "resume", "req"})
TYPES = REQUEST_TYPES | {"ack", "ping", "pong"}


def parse(payload, max_depth=None):
    """
    Check one payload and return its L{Envelope}.

    @param max_depth: the deepest nesting accepted (C{session.max_depth}).
    @raise ProtocolViolation: C{bad_json}; the connection is then closed.
    @raise GateError: C{bad_request} or C{unknown_type}, with an C{id}
        attribute (or C{None}) for the C{err} reply.
    """
    try:
        obj = _decoder.decode(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolViolation(errors.BAD_JSON, f"payload is not UTF-8 JSON: {e}")
    if max_depth is not None and too_deep(payload, max_depth):
        raise ProtocolViolation(errors.BAD_JSON, f"payload nests deeper than "
                                                 f"{max_depth} levels")
    if (b"\\ud" in payload or b"\\uD" in payload) and _lone_surrogate(obj):
        raise ProtocolViolation(errors.BAD_JSON, "payload has a \\ud800-"
                                                 "\\udfff escape without its "
                                                 "pair")
    if not isinstance(obj, dict):
        raise ProtocolViolation(errors.BAD_JSON, "payload is not a JSON object")
    rid = obj.get("id")
    if not _is_int(rid):
        rid = None
    kind = obj.get("t")
    if not isinstance(kind, str):
        raise _BadRequest(rid, "'t' must be a string naming the envelope type")
    if kind not in TYPES:
        e = GateError(errors.UNKNOWN_TYPE, f"unknown envelope type {kind[:64]!r}")
        e.id = rid
        raise e
    if kind in REQUEST_TYPES:
        if "id" not in obj or rid is None:
            raise _BadRequest(None, "'id' must be an integer")
    fields = {}
    if kind == "req":
        route = obj.get("route")
        if not valid_route(route):
            raise _BadRequest(rid, "'route' must be a route name "
                                   "(letters, digits, _ . : / -; up to 128)")
        fields["route"] = route
        fields["data"] = obj.get("data")
    elif kind == "login":
        fields["data"] = obj.get("data")
    elif kind == "auth":
        fields["token"] = _need(obj, "token", lambda v: isinstance(v, str) and v,
                                "a non-empty string", rid)
    elif kind == "resume":
        fields["player_id"] = _need(obj, "player_id",
                                    lambda v: isinstance(v, str) and v,
                                    "a non-empty string", rid)
        fields["resume_token"] = _need(obj, "resume_token",
                                       lambda v: isinstance(v, str) and v,
                                       "a non-empty string", rid)
        fields["last_seq"] = _need(obj, "last_seq",
                                   lambda v: _is_int(v) and v >= 0,
                                   "an integer >= 0", rid)
    elif kind == "ack":
        fields["seq"] = _need(obj, "seq", lambda v: _is_int(v) and v >= 0,
                              "an integer >= 0", None)
    elif kind in ("ping", "pong"):
        ts = obj.get("ts")
        if ts is not None and (isinstance(ts, bool)
                               or not isinstance(ts, (int, float, str))):
            raise _BadRequest(None, "'ts' must be a number or a string")
        fields["ts"] = ts
    return Envelope(kind, rid, fields)


class Outgoing:
    """
    One message for clients, encoded once however many sessions it goes to.

    The WebSocket transport caches its prepared frame in C{ws}; the TCP
    transport uses L{framed}.
    """

    __slots__ = ("payload", "_framed", "ws", "seq")

    def __init__(self, payload, seq=None):
        self.payload = payload
        self._framed = None
        self.ws = None
        self.seq = seq

    @property
    def framed(self):
        if self._framed is None:
            self._framed = frame(self.payload)
        return self._framed


def message(obj):
    """
    An L{Outgoing} for a gate-to-client envelope given as a dict.
    """
    return Outgoing(encode(obj))


def resp(rid, data, **extra):
    obj = {"t": "resp", "id": rid, "data": data}
    obj.update(extra)
    return message(obj)


def err(rid, code, msg):
    obj = {"t": "err", "code": code, "msg": msg}
    if rid is not None:
        obj["id"] = rid
    return message(obj)


class PushTemplate:
    """
    A push encoded once, its C{seq} spliced in per player.

    A persistent push to many players differs only in C{seq}: the route,
    data and timestamp are encoded once and each player's message is a copy
    of those bytes with its number appended.
    """

    __slots__ = ("route", "data", "ts", "_head", "_transient")

    def __init__(self, route, data, ts):
        self.route = route
        self.data = data
        self.ts = ts
        body = encode({"t": "push", "route": route, "data": data, "ts": ts})
        self._head = body[:-1]
        self._transient = None

    @property
    def head(self):
        """
        The encoded push without its closing brace: what a shared store
        carries to other gates (L{from_head}).
        """
        return self._head

    @classmethod
    def from_head(cls, head):
        """
        The template of a push another gate encoded (L{head}); its route,
        data and time are not decoded again.
        """
        template = cls.__new__(cls)
        template.route = template.data = template.ts = None
        template._head = head
        template._transient = None
        return template

    def transient(self):
        """
        The message without a seq, shared by every recipient.
        """
        if self._transient is None:
            self._transient = Outgoing(self._head + b"}")
        return self._transient

    def with_seq(self, seq):
        return Outgoing(b"%s,\"seq\":%d}" % (self._head, seq), seq=seq)
