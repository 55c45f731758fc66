"""
Tests for L{gate.config}: the keys of PROTOCOL.md section 7, checked up
front with a message naming the key.
"""

from twisted.trial.unittest import SynchronousTestCase

from gate import config
from gate.config import (DEV_API_KEY, KEYS, SCHEMA, Config, ConfigError, Key,
                         _coerce, from_mapping, load)
from tests.certs import make_pki

REQUIRED = {"api": {"key": "k"}, "auth": {"secret": "s" * 32}}


def table(**sections):
    """
    A config table with the required keys plus C{sections}.
    """
    result = {name: dict(values) for name, values in REQUIRED.items()}
    for name, values in sections.items():
        result.setdefault(name, {}).update(values)
    return result


class SchemaTests(SynchronousTestCase):
    def test_protocol_keys_declared(self):
        """
        Every key PROTOCOL.md section 7 names is in the schema.
        """
        for name in ("gate.id", "listen.tcp", "listen.ws", "listen.api",
                     "listen.metrics", "backend.url", "backend.timeout",
                     "backend.secret", "api.key", "api.max_body",
                     "auth.secret", "session.max_frame",
                     "session.heartbeat_ttl", "player.idle_timeout",
                     "player.mailbox_max"):
            self.assertIn(name, KEYS)

    def test_protocol_defaults(self):
        c = from_mapping(table())
        self.assertEqual(c["session.max_frame"], 65536)
        self.assertEqual(c["session.heartbeat_ttl"], 60.0)
        self.assertEqual(c["player.idle_timeout"], 1800.0)
        self.assertEqual(c["listen.tcp"], "tcp:8080:interface=127.0.0.1")
        self.assertEqual(c["listen.ws"], "tcp:8081:interface=127.0.0.1")
        self.assertEqual(c["listen.api"], "tcp:8090:interface=127.0.0.1")
        self.assertEqual(c["listen.metrics"], "tcp:9090:interface=127.0.0.1")

    def test_defaults_have_their_types(self):
        for key in SCHEMA:
            if key.default is not None:
                self.assertIsInstance(key.default, key.type, key.name)


class FromMappingTests(SynchronousTestCase):
    def assertConfigError(self, mapping, key, from_file=True):
        e = self.assertRaises(ConfigError, from_mapping, mapping,
                              from_file=from_file)
        self.assertTrue(str(e).startswith(key + ":"), str(e))
        self.assertNotIn("\n", str(e))
        return e

    def test_nested_and_values(self):
        c = from_mapping(table(gate={"id": "g7"}, session={"max_frame": 100},
                               backend={"url": "http://b", "timeout": 2}))
        self.assertEqual(c["gate.id"], "g7")
        self.assertEqual(c["session.max_frame"], 100)
        self.assertEqual(c["backend.url"], "http://b")
        self.assertEqual(c["backend.timeout"], 2.0)
        self.assertIsInstance(c["backend.timeout"], float)
        self.assertEqual(c["api.key"], "k")

    def test_gate_id_defaults_to_host_name(self):
        self.patch(config, "_gate_id", lambda: "host-1")
        self.assertEqual(from_mapping(table())["gate.id"], "host-1")

    def test_unknown_key(self):
        self.assertConfigError(table(session={"max_fram": 1}),
                               "session.max_fram")
        self.assertConfigError(table(nope={"x": 1}), "nope.x")
        self.assertConfigError(dict(table(), toplevel=1), "toplevel")

    def test_unknown_key_below_a_known_one(self):
        """
        A table where a value belongs is an unknown key, named in full.
        """
        self.assertConfigError(table(session={"max_frame": {"a": 1}}),
                               "session.max_frame.a")

    def test_section_given_a_value(self):
        self.assertConfigError(dict(table(), session=5), "session")

    def test_int_key(self):
        for bad in (1.0, 2.5, "3", True, False, [1]):
            self.assertConfigError(table(session={"max_frame": bad}),
                                   "session.max_frame")

    def test_float_key(self):
        self.assertEqual(from_mapping(table(
            session={"heartbeat_ttl": 5}))["session.heartbeat_ttl"], 5.0)
        for bad in ("5", True, False, [5.0]):
            self.assertConfigError(table(session={"heartbeat_ttl": bad}),
                                   "session.heartbeat_ttl")

    def test_str_key(self):
        for bad in (1, 1.5, True, ["tcp:1"]):
            self.assertConfigError(table(listen={"tcp": bad}), "listen.tcp")

    def test_list_key(self):
        c = from_mapping(table(gate={"advertise": ["tcp://a:1", "ws://b/ws"]}))
        self.assertEqual(c["gate.advertise"], ["tcp://a:1", "ws://b/ws"])
        for bad in ("tcp://a:1", 1, True, [1], ["a", 2], [["a"]]):
            self.assertConfigError(table(gate={"advertise": bad}),
                                   "gate.advertise")

    def test_bool_type(self):
        """
        A boolean key takes only true or false (not 0/1 or strings).
        """
        key = Key("x.flag", bool, False, "a flag")
        self.assertIs(_coerce(key, True), True)
        self.assertIs(_coerce(key, False), False)
        for bad in (0, 1, "true", 1.0, []):
            e = self.assertRaises(ConfigError, _coerce, key, bad)
            self.assertTrue(str(e).startswith("x.flag:"))

    def test_minimums(self):
        """
        The minimum itself is allowed, anything below is not.
        """
        for section, name, minimum, below in (
                ("session", "max_frame", 16, 15),
                ("api", "max_body", 2, 1),
                ("player", "mailbox_max", 1, 0),
                ("session", "max_inflight", 1, 0),
                ("backend", "register_interval", 0, -1),
                ("workers", "min", 0, -1),
                ("player", "idle_timeout", 0.01, 0.001),
                ("backend", "timeout", 0.001, 0)):
            c = from_mapping(table(**{section: {name: minimum}}))
            self.assertEqual(c[f"{section}.{name}"], minimum)
            self.assertConfigError(table(**{section: {name: below}}),
                                   f"{section}.{name}")

    def test_required_keys_with_a_file(self):
        mapping = table()
        del mapping["api"]
        self.assertConfigError(mapping, "api.key")
        mapping = table()
        del mapping["auth"]
        self.assertConfigError(mapping, "auth.secret")

    def test_required_keys_not_empty(self):
        self.assertConfigError(table(api={"key": ""}), "api.key")
        self.assertConfigError(table(auth={"secret": ""}), "auth.secret")

    def test_dev_defaults(self):
        """
        Without a file the API key is the documented development key and
        the auth secret a random one of 32 bytes.
        """
        first = from_mapping({}, from_file=False)
        second = from_mapping({}, from_file=False)
        self.assertEqual(first["api.key"], DEV_API_KEY)
        self.assertEqual(len(first["auth.secret"]), 64)
        self.assertNotEqual(first["auth.secret"], second["auth.secret"])
        self.assertEqual(first["backend.url"], "")

    def test_workers_max_below_min(self):
        self.assertConfigError(table(workers={"min": 5, "max": 4}),
                               "workers.max")
        from_mapping(table(workers={"min": 4, "max": 4}))

    def test_api_listener_required(self):
        self.assertConfigError(table(listen={"api": ""}), "listen.api")

    def test_other_listeners_may_be_disabled(self):
        c = from_mapping(table(listen={"tcp": "", "ws": "", "metrics": ""}))
        self.assertEqual((c["listen.tcp"], c["listen.ws"], c["listen.metrics"]),
                         ("", "", ""))


class ConfigObjectTests(SynchronousTestCase):
    def test_replace(self):
        c = from_mapping(table())
        changed = c.replace(session__max_frame=32, backend__timeout=1)
        self.assertEqual(changed["session.max_frame"], 32)
        self.assertEqual(changed["backend.timeout"], 1.0)
        self.assertEqual(c["session.max_frame"], 65536)

    def test_replace_checks(self):
        c = from_mapping(table())
        e = self.assertRaises(ConfigError, c.replace, session__max_frame=1)
        self.assertTrue(str(e).startswith("session.max_frame:"))
        e = self.assertRaises(ConfigError, c.replace, nope__x=1)
        self.assertTrue(str(e).startswith("nope.x:"))

    def test_as_dict_is_a_copy(self):
        c = from_mapping(table())
        d = c.as_dict()
        d["api.key"] = "changed"
        self.assertEqual(c["api.key"], "k")
        self.assertEqual(set(d), set(KEYS))

    def test_unknown_name(self):
        self.assertRaises(KeyError, lambda: Config({})["x"])


class LoadTests(SynchronousTestCase):
    def write(self, content):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str)
                    else content)
        return path

    def test_no_file_is_dev_defaults(self):
        c = load(None)
        self.assertEqual(c["api.key"], DEV_API_KEY)
        self.assertEqual(c["backend.url"], "")

    def test_good_file(self):
        path = self.write('[gate]\nid = "g1"\n[api]\nkey = "k"\n'
                          '[auth]\nsecret = "' + "s" * 32 + '"\n'
                          "[session]\nmax_frame = 1024\nheartbeat_ttl = 30\n")
        c = load(path)
        self.assertEqual(c["gate.id"], "g1")
        self.assertEqual(c["session.max_frame"], 1024)
        self.assertEqual(c["session.heartbeat_ttl"], 30.0)

    def test_dotted_keys(self):
        path = self.write('api.key = "k"\nauth.secret = "' + "s" * 32 + '"\n'
                          'session.max_frame = 99\n')
        self.assertEqual(load(path)["session.max_frame"], 99)

    def test_short_auth_secret(self):
        """
        An HS256 key shorter than 32 bytes stops start-up, naming the key.
        """
        path = self.write('api.key = "k"\nauth.secret = "' + "s" * 31 + '"\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertTrue(str(e).startswith("auth.secret:"), str(e))

    def test_missing_required_in_file(self):
        path = self.write('[api]\nkey = "k"\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertTrue(str(e).startswith("auth.secret:"), str(e))

    def test_empty_file(self):
        e = self.assertRaises(ConfigError, load, self.write(""))
        self.assertTrue(str(e).startswith("api.key:"), str(e))

    def test_wrong_type_in_file(self):
        path = self.write('api.key = "k"\nauth.secret = "s"\n'
                          'session.max_frame = "big"\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertTrue(str(e).startswith("session.max_frame:"), str(e))

    def test_unknown_key_in_file(self):
        path = self.write('api.key = "k"\nauth.secret = "s"\n'
                          '[sesion]\nmax_frame = 1\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertTrue(str(e).startswith("sesion.max_frame:"), str(e))

    def test_invalid_toml(self):
        path = self.write('api.key = "k\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn("not valid TOML", str(e))
        self.assertIn(path.rsplit("/", 1)[-1], str(e))

    def test_duplicate_key(self):
        path = self.write('api.key = "k"\napi.key = "j"\nauth.secret = "s"\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn("not valid TOML", str(e))

    def test_invalid_utf8(self):
        """
        A file that is not UTF-8 is a configuration error like any other
        unreadable file, not a traceback.
        """
        path = self.write(b'api.key = "k\xff"\nauth.secret = "s"\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn(path.rsplit("/", 1)[-1], str(e))

    def test_missing_file(self):
        path = self.mktemp()
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn(path, str(e))
        self.assertIn("cannot read", str(e))

    def test_directory(self):
        import os
        path = self.mktemp()
        os.makedirs(path)
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn("cannot read", str(e))


class EndpointAndURLTests(SynchronousTestCase):
    def test_bad_endpoint(self):
        e = self.assertRaises(ConfigError, from_mapping,
                              table(listen={"tcp": "tcp:bogus"}))
        self.assertTrue(str(e).startswith("listen.tcp:"), str(e))

    def test_tls_endpoint_files(self):
        """
        C{ssl:} endpoints load their files at start-up: a missing or
        mismatched key stops it with one line naming the key and the file.
        """
        pki, other = make_pki(self.mktemp()), make_pki(self.mktemp())
        config = from_mapping(table(listen={"ws": pki.endpoint()}))
        self.assertEqual(config["listen.ws"], pki.endpoint())
        missing = self.mktemp()
        for endpoint, why in [
                (f"ssl:0:privateKey={missing}:certKey={pki.cert_file}",
                 missing),
                (f"ssl:0:privateKey={other.key_file}"
                 f":certKey={pki.cert_file}", "do not match")]:
            e = self.assertRaises(ConfigError, from_mapping,
                                  table(listen={"ws": endpoint}))
            self.assertTrue(str(e).startswith("listen.ws:"), str(e))
            self.assertIn(why, str(e))
            self.assertNotIn("\n", str(e))

    def test_bad_backend_url(self):
        for url in ("127.0.0.1:8000", "ftp://x/", "http://",
                    "http://127.0.0.1:99999"):
            e = self.assertRaises(ConfigError, from_mapping,
                                  table(backend={"url": url}))
            self.assertTrue(str(e).startswith("backend.url:"), str(e))
        config = from_mapping(table(backend={"url": "https://b.example:8443/g"}))
        self.assertEqual(config["backend.url"], "https://b.example:8443/g")
