"""
Tests for L{gate.envelope}: strict parsing of client envelopes and encoding
of the gate's (PROTOCOL.md section 2).
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from gate import envelope, errors
from gate.envelope import PushTemplate, err, parse, resp, valid_route
from gate.errors import GateError, ProtocolViolation


def raw(obj):
    return json.dumps(obj).encode("utf-8")


class ParseGoodTests(SynchronousTestCase):
    """
    Every client envelope type, well formed.
    """

    def test_login(self):
        env = parse(raw({"t": "login", "id": 1, "data": {"name": "a"}}))
        self.assertEqual((env.type, env.id, env["data"]), ("login", 1, {"name": "a"}))

    def test_login_without_data(self):
        env = parse(raw({"t": "login", "id": 2}))
        self.assertEqual(env["data"], None)

    def test_auth(self):
        env = parse(raw({"t": "auth", "id": 3, "token": "abc"}))
        self.assertEqual((env.type, env.id, env["token"]), ("auth", 3, "abc"))

    def test_resume(self):
        env = parse(raw({"t": "resume", "id": 4, "player_id": "p",
                         "resume_token": "tok", "last_seq": 0}))
        self.assertEqual(env.type, "resume")
        self.assertEqual(env.id, 4)
        self.assertEqual(env.fields, {"player_id": "p", "resume_token": "tok",
                                      "last_seq": 0})

    def test_req(self):
        env = parse(raw({"t": "req", "id": 5, "route": "shop.buy",
                         "data": [1, 2]}))
        self.assertEqual((env.type, env.id, env["route"], env["data"]),
                         ("req", 5, "shop.buy", [1, 2]))

    def test_req_without_data(self):
        self.assertIsNone(parse(raw({"t": "req", "id": 5, "route": "r"}))["data"])

    def test_ack(self):
        env = parse(raw({"t": "ack", "seq": 7}))
        self.assertEqual((env.type, env.id, env["seq"]), ("ack", None, 7))

    def test_ack_zero(self):
        self.assertEqual(parse(raw({"t": "ack", "seq": 0}))["seq"], 0)

    def test_ping(self):
        for ts in (None, 1, 1.5, "x"):
            obj = {"t": "ping"} if ts is None else {"t": "ping", "ts": ts}
            env = parse(raw(obj))
            self.assertEqual((env.type, env["ts"]), ("ping", ts))

    def test_pong(self):
        self.assertEqual(parse(raw({"t": "pong", "ts": 3.25}))["ts"], 3.25)

    def test_id_zero_and_negative_and_large(self):
        """
        C{id} is any integer chosen by the client.
        """
        for rid in (0, -1, 2 ** 62):
            self.assertEqual(parse(raw({"t": "login", "id": rid})).id, rid)

    def test_extra_fields_ignored(self):
        env = parse(raw({"t": "ping", "zzz": 1}))
        self.assertEqual(env.fields, {"ts": None})


class ParseBadJSONTests(SynchronousTestCase):
    """
    Payloads that are not one UTF-8 JSON object: C{bad_json}, a
    L{ProtocolViolation} that closes the connection.
    """

    def assertBadJSON(self, payload):
        e = self.assertRaises(ProtocolViolation, parse, payload)
        self.assertEqual(e.code, errors.BAD_JSON)
        return e

    def test_not_json(self):
        self.assertBadJSON(b"{nope")

    def test_empty(self):
        self.assertBadJSON(b"")

    def test_invalid_utf8(self):
        self.assertBadJSON(b'{"t": "ping", "ts": "\xff\xfe"}')

    def test_utf16(self):
        self.assertBadJSON('{"t": "ping"}'.encode("utf-16"))

    def test_non_object(self):
        for payload in (b"[]", b"1", b'"ping"', b"null", b"true",
                        b'[{"t": "ping"}]'):
            self.assertBadJSON(payload)

    def test_nan_and_infinity(self):
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            self.assertBadJSON(b'{"t": "ping", "ts": ' + constant + b"}")
            self.assertBadJSON(b'{"t": "req", "id": 1, "route": "r", "data": '
                               + constant + b"}")

    def test_overflowing_number(self):
        """
        A number too large for a float (C{1e999}) is as unusable as C{NaN}:
        decoded, it would become infinity, which the gate cannot encode back
        (its encoder refuses non-finite floats) when it echoes C{ts} in the
        C{pong} or forwards C{data} to the backend.
        """
        self.assertBadJSON(b'{"t": "ping", "ts": 1e999}')
        self.assertBadJSON(b'{"t": "req", "id": 1, "route": "r", '
                           b'"data": -1e999}')

    def test_deep_nesting(self):
        """
        Nesting deep enough to exhaust the decoder's recursion is bad_json,
        not a crash.
        """
        self.assertBadJSON(b"[" * 100000 + b"]" * 100000)
        self.assertBadJSON(b'{"t": "req", "id": 1, "route": "r", "data": '
                           + b"[" * 100000 + b"]" * 100000 + b"}")
        self.assertBadJSON(b'{"a":' * 100000 + b"1" + b"}" * 100000)

    def test_huge_integer(self):
        self.assertBadJSON(b'{"t": "ack", "seq": ' + b"9" * 5000 + b"}")

    def test_max_depth(self):
        """
        Nesting beyond C{max_depth} (the envelope itself is level 1) is
        bad_json; brackets inside strings do not count.
        """
        def req(depth):
            return (b'{"t": "req", "id": 1, "route": "r", "data": '
                    + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}")
        self.assertEqual(parse(req(32), max_depth=32).type, "req")
        e = self.assertRaises(ProtocolViolation, parse, req(33),
                              max_depth=32)
        self.assertEqual(e.code, errors.BAD_JSON)
        self.assertIn("32", e.msg)
        mixed = b'{"t": "ping", "ts": "x", "a": [{"b": [{"c": {}}]}]}'
        self.assertEqual(parse(mixed, max_depth=6).type, "ping")
        self.assertRaises(ProtocolViolation, parse, mixed, max_depth=5)
        text = b'{"t": "req", "id": 1, "route": "r", "data": "' \
            + b"[{\\\"" * 1000 + b'"}'
        self.assertEqual(parse(text, max_depth=2).type, "req")
        # Without a limit only the decoder's recursion bounds it.
        self.assertEqual(parse(req(200)).type, "req")
        self.assertBadJSON(b"[" * 100000 + b"]" * 100000)
        self.assertRaises(ProtocolViolation, parse,
                          b"[" * 100000 + b"]" * 100000, max_depth=32)

    def test_trailing_garbage(self):
        self.assertBadJSON(b'{"t": "ping"} x')
        self.assertBadJSON(b'{"t": "ping"}{"t": "ping"}')


class DepthTests(SynchronousTestCase):
    """
    L{envelope.too_deep}, which L{parse} and the push API use.
    """

    def test_depths(self):
        for depth in range(1, 40):
            data = raw(eval("[" * depth + "]" * depth))
            self.assertEqual(envelope.too_deep(data, 32), depth > 32, depth)

    def test_objects_and_arrays_alike(self):
        data = raw({"a": [{"b": [{"c": [1, {"d": []}]}]}]})
        self.assertFalse(envelope.too_deep(data, 8))
        self.assertTrue(envelope.too_deep(data, 7))

    def test_siblings_do_not_add_up(self):
        data = raw([[[]] for _ in range(1000)])
        self.assertFalse(envelope.too_deep(data, 3))
        self.assertTrue(envelope.too_deep(data, 2))

    def test_strings_ignored(self):
        data = raw({"s": "[[[[{{{{" * 100, "e": "\\\"[[[", "u": "\u005b["})
        self.assertFalse(envelope.too_deep(data, 1))
        self.assertTrue(envelope.too_deep(raw([{"s": "]]]}}}"}]), 1))

    def test_many_chains_at_the_limit(self):
        """
        Many chains as deep as allowed: each pass removes one level of all
        of them.
        """
        chain = b"[" * 31 + b"1" + b"]" * 31
        data = b"[" + b",".join([chain] * 1000) + b"]"
        self.assertFalse(envelope.too_deep(data, 32))
        self.assertTrue(envelope.too_deep(data, 31))


class ParseBadRequestTests(SynchronousTestCase):
    """
    A JSON object of the wrong shape: C{bad_request} (or C{unknown_type}),
    with the request's id when it has a usable one.
    """

    def assertCode(self, obj, code, rid):
        e = self.assertRaises(GateError, parse, raw(obj))
        self.assertNotIsInstance(e, ProtocolViolation)
        self.assertEqual((e.code, e.id), (code, rid), obj)
        self.assertIsInstance(e.msg, str)
        return e

    def assertBad(self, obj, rid):
        return self.assertCode(obj, errors.BAD_REQUEST, rid)

    def test_missing_type(self):
        self.assertBad({"id": 1}, 1)
        self.assertBad({}, None)

    def test_type_not_string(self):
        self.assertBad({"t": 1, "id": 9}, 9)
        self.assertBad({"t": None, "id": 9}, 9)
        self.assertBad({"t": ["req"], "id": 9}, 9)

    def test_unknown_type(self):
        e = self.assertCode({"t": "teleport", "id": 3}, errors.UNKNOWN_TYPE, 3)
        self.assertIn("teleport", e.msg)
        self.assertCode({"t": "teleport"}, errors.UNKNOWN_TYPE, None)
        # Gate-to-client types are not client types.
        for kind in ("resp", "err", "push", "gap", "kick", "reconnect", ""):
            self.assertCode({"t": kind, "id": 1}, errors.UNKNOWN_TYPE, 1)

    def test_unknown_type_message_bounded(self):
        e = self.assertCode({"t": "x" * 10000}, errors.UNKNOWN_TYPE, None)
        self.assertLess(len(e.msg), 200)

    def test_request_types_need_integer_id(self):
        base = {"login": {}, "auth": {"token": "t"},
                "resume": {"player_id": "p", "resume_token": "r",
                           "last_seq": 0},
                "req": {"route": "r"}}
        for kind, fields in base.items():
            for bad in ("1", 1.0, 1.5, True, False, None, [1], {"a": 1}):
                self.assertBad(dict(fields, t=kind, id=bad), None)
            self.assertBad(dict(fields, t=kind), None)

    def test_auth_token(self):
        for bad in (None, "", 1, True, ["t"], {"a": "b"}):
            self.assertBad({"t": "auth", "id": 2, "token": bad}, 2)
        self.assertBad({"t": "auth", "id": 2}, 2)

    def test_resume_fields(self):
        good = {"t": "resume", "id": 8, "player_id": "p", "resume_token": "r",
                "last_seq": 3}
        parse(raw(good))
        for name, bads in (("player_id", (None, "", 1, True, ["p"])),
                           ("resume_token", (None, "", 1, False, {})),
                           ("last_seq", (None, -1, 1.0, 2.5, "3", True,
                                         False, [3]))):
            for bad in bads:
                self.assertBad(dict(good, **{name: bad}), 8)
            missing = dict(good)
            del missing[name]
            self.assertBad(missing, 8)

    def test_req_route(self):
        for bad in (None, "", 1, True, ["r"], "../admin", "a/../b", "a..b",
                    "/abs", ".hidden", "-x", "a b", "a?b", "a#b", "a%2e",
                    "é", "r" * 129, "a\n", "a\x00"):
            self.assertBad({"t": "req", "id": 6, "route": bad}, 6)
        self.assertBad({"t": "req", "id": 6}, 6)

    def test_ack_seq(self):
        """
        C{ack} needs a non-negative integer C{seq}; it is not a request, so
        the error has no id.
        """
        for bad in (-1, 1.0, 1.5, "1", True, False, None, [1]):
            self.assertBad({"t": "ack", "seq": bad, "id": 4}, None)
        self.assertBad({"t": "ack"}, None)

    def test_ping_ts(self):
        for bad in (True, False, [1], {"a": 1}):
            self.assertBad({"t": "ping", "ts": bad}, None)
            self.assertBad({"t": "pong", "ts": bad}, None)


class RouteTests(SynchronousTestCase):
    def test_valid(self):
        for route in ("echo", "a", "_", "0", "shop.buy", "guild/members:list",
                      "a-b_c.d:e/f", "r" * 128, "a/b/c"):
            self.assertTrue(valid_route(route), route)

    def test_invalid(self):
        for route in ("", "r" * 129, "..", "a..b", "a/../b", "/a", ".a",
                      ":a", "a b", "a\tb", "ü", None, 5, b"echo", "a\n"):
            self.assertFalse(valid_route(route), route)


class EncodeTests(SynchronousTestCase):
    def test_encode_compact_utf8(self):
        self.assertEqual(envelope.encode({"a": "é", "b": [1, 2]}),
                         '{"a":"é","b":[1,2]}'.encode("utf-8"))

    def test_encode_refuses_nan(self):
        self.assertRaises(ValueError, envelope.encode, {"x": float("nan")})

    def test_resp(self):
        out = resp(3, {"k": 1}, player_id="p", last_seq=0)
        self.assertEqual(json.loads(out.payload),
                         {"t": "resp", "id": 3, "data": {"k": 1},
                          "player_id": "p", "last_seq": 0})
        self.assertIsNone(out.seq)

    def test_err_with_and_without_id(self):
        self.assertEqual(json.loads(err(5, "busy", "m").payload),
                         {"t": "err", "id": 5, "code": "busy", "msg": "m"})
        self.assertEqual(json.loads(err(None, "bad_json", "m").payload),
                         {"t": "err", "code": "bad_json", "msg": "m"})
        # An id of 0 is an id.
        self.assertEqual(json.loads(err(0, "busy", "m").payload)["id"], 0)

    def test_framed(self):
        out = envelope.message({"t": "pong", "ts": 1})
        self.assertEqual(out.framed, len(out.payload).to_bytes(4, "big")
                         + out.payload)
        self.assertIs(out.framed, out.framed)

    def test_push_template(self):
        template = PushTemplate("chat", {"m": "hi"}, 12.5)
        transient = json.loads(template.transient().payload)
        self.assertEqual(transient, {"t": "push", "route": "chat",
                                     "data": {"m": "hi"}, "ts": 12.5})
        self.assertIsNone(template.transient().seq)
        self.assertIs(template.transient(), template.transient())
        for seq in (1, 7, 123456789):
            out = template.with_seq(seq)
            self.assertEqual(out.seq, seq)
            self.assertEqual(json.loads(out.payload),
                             dict(transient, seq=seq))

    def test_push_template_empty_data(self):
        template = PushTemplate("r", None, 0.0)
        self.assertEqual(json.loads(template.with_seq(1).payload),
                         {"t": "push", "route": "r", "data": None, "ts": 0.0,
                          "seq": 1})
