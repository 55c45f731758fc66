"""
Tests for L{gate.tap}: C{twistd mmogate} options (PROTOCOL.md section 7).
"""

import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from gate.config import DEV_API_KEY, SCHEMA, Config
from gate.tap import Options, keys_table, makeService

GOOD = ('[gate]\nid = "g9"\n[api]\nkey = "k"\n[auth]\nsecret = "'
        + "s" * 32 + '"\n[backend]\nurl = "http://backend.test"\n'
        "register_interval = 0\n[workers]\nmin = 1\n")


class OptionsTests(SynchronousTestCase):
    def write(self, content):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str)
                    else content)
        return path

    def parse(self, *args):
        options = Options()
        options.parseOptions(list(args))
        return options

    def assertConfigExit(self, path, *names):
        e = self.assertRaises(SystemExit, self.parse, "--config", path)
        message = str(e.code)
        self.assertIsInstance(e.code, str)
        self.assertNotIn("\n", message.strip())
        self.assertIn("configuration error", message)
        for name in names:
            self.assertIn(name, message)
        return message

    def test_good_config(self):
        options = self.parse("--config", self.write(GOOD))
        config = options.gate_config
        self.assertIsInstance(config, Config)
        self.assertEqual(config["gate.id"], "g9")
        self.assertEqual(config["api.key"], "k")
        self.assertEqual(config["backend.url"], "http://backend.test")

    def test_short_option(self):
        options = self.parse("-c", self.write(GOOD))
        self.assertEqual(options.gate_config["gate.id"], "g9")

    def test_no_config_is_dev(self):
        options = self.parse()
        self.assertEqual(options.gate_config["api.key"], DEV_API_KEY)
        self.assertEqual(options.gate_config["backend.url"], "")

    def test_unknown_key(self):
        self.assertConfigExit(self.write(GOOD + "[session]\nmax_frames = 5\n"),
                              "session.max_frames")

    def test_wrong_type(self):
        self.assertConfigExit(self.write(GOOD + '[session]\nmax_frame = "x"\n'),
                              "session.max_frame")

    def test_below_minimum(self):
        self.assertConfigExit(self.write(GOOD + "[session]\nmax_frame = 1\n"),
                              "session.max_frame")

    def test_missing_required(self):
        self.assertConfigExit(self.write('[api]\nkey = "k"\n'), "auth.secret")

    def test_bad_toml(self):
        path = self.write('[api\nkey = "k"\n')
        self.assertConfigExit(path, path.rsplit("/", 1)[-1], "TOML")

    def test_missing_file(self):
        path = self.mktemp()
        self.assertConfigExit(path, path)

    def test_not_utf8(self):
        path = self.write(b'[api]\nkey = "\xff"\n')
        self.assertConfigExit(path, path.rsplit("/", 1)[-1])

    def test_keys(self):
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, self.parse, "--keys")
        self.assertEqual(e.code, 0)
        text = out.getvalue()
        self.assertEqual(text, keys_table() + "\n")
        for key in SCHEMA:
            self.assertIn(key.name, text)
        self.assertIn("api.key (str, required in a config file)", text)
        self.assertIn("session.max_frame (int, 65536)", text)

    def test_make_service(self):
        options = self.parse("--config", self.write(GOOD))
        top = makeService(options)
        from gate.service import GateService
        from gate.tap import SigtermIsAStop
        service, sigterm = list(top)
        self.addCleanup(service.pool.stop)
        self.assertIsInstance(service, GateService)
        self.assertIsInstance(sigterm, SigtermIsAStop)
        self.assertEqual(service.gate_id, "g9")
        self.assertIsNone(service.reference)
        self.assertEqual(sorted(service.listeners),
                         ["api", "metrics", "tcp", "ws"])
        self.assertFalse(service.running)


class ReadmeTests(SynchronousTestCase):
    def test_config_table_current(self):
        """
        README.md's configuration table is the one the schema makes: every
        key, with its type and default.
        """
        import os

        from gate.tap import keys_markdown
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        self.assertIn(keys_markdown(), readme,
                      "README.md is stale: paste gate.tap.keys_markdown()")


class StartErrorTests(SynchronousTestCase):
    def test_port_in_use_named(self):
        """
        A listener that cannot bind stops start-up with an error naming its
        key (an exception, which twistd reports and cleans up after, also
        when daemonized).
        """
        import socket
        import tempfile
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        path = tempfile.mktemp(suffix=".toml")
        with open(path, "w") as f:
            f.write('[api]\nkey = "k"\n[auth]\nsecret = "' + "s" * 32
                    + '"\n[listen]\ntcp = "tcp:%d:interface=127.0.0.1"\n'
                    'ws = ""\napi = "tcp:0:interface=127.0.0.1"\n'
                    'metrics = ""\n[backend]\nurl = "http://127.0.0.1:9"\n'
                    % (port,))
        self.addCleanup(os.remove, path)
        options = Options()
        options.parseOptions(["--config", path])
        top = makeService(options)
        from gate.service import ListenError
        e = self.assertRaises(ListenError, top.privilegedStartService)
        self.assertTrue(str(e).startswith("listen.tcp: cannot listen on"),
                        str(e))
        gate = list(top)[0]
        for listener in gate.listeners.values():
            if listener.port is not None:
                listener.port.stopListening()
        gate.pool.stop()
