"""
C{twistd mmogate}: options and wiring. Tests: C{tests/test_tap.py}.
"""

import signal
import sys

from twisted.application.service import MultiService, Service
from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from gate.config import SCHEMA, ConfigError, load
from gate.keys import load_or_create, public_key_b64


def keys_table():
    """
    Every configuration key with its default and meaning, one per line.
    """
    lines = []
    for key in SCHEMA:
        if key.required:
            default = "required in a config file"
        elif key.default in (None, "", []):
            default = "unset"
        else:
            default = repr(key.default)
        lines.append(f"{key.name} ({key.type.__name__}, {default})\n"
                     f"    {key.doc}")
    return "\n".join(lines)


#: What a required key's default column says.
REQUIRED_DEFAULTS = {
    "api.key": "required in a file (`dev-api-key` without one)",
    "auth.secret": "required in a file, at least 32 bytes (random without "
                   "one)",
}


def keys_markdown():
    """
    The configuration reference table of README.md.
    """
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key in SCHEMA:
        if key.required:
            default = REQUIRED_DEFAULTS.get(key.name, "required in a file")
        elif key.default in (None, "", []):
            default = "unset"
        else:
            default = "`" + repr(key.default).replace("'", '"') + "`"
        rows.append(f"| `{key.name}` | {key.type.__name__} | {default} | "
                    f"{key.doc} |")
    return "\n".join(rows)


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run an mmogate game gateway. Without --config it runs on "
                "loopback with an in-memory store and the bundled reference "
                "backend. The config file is TOML; --keys lists every key.")
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
    ]
    optFlags = [
        ["public-key", None, "Print the base64 Ed25519 public key of "
         "encrypt.key_file (creating the key if missing), for clients to "
         "pin, and exit."],
    ]

    def opt_keys(self):
        """
        List the configuration keys with their defaults and exit.
        """
        print(keys_table())
        sys.exit(0)

    def postOptions(self):
        try:
            self.gate_config = load(self["config"])
        except ConfigError as e:
            # One line naming the key, and a non-zero exit: twistd would
            # otherwise print the whole usage text around it.
            raise SystemExit(f"mmogate: configuration error: {e}")
        if self["public-key"]:
            try:
                key = load_or_create(self.gate_config["encrypt.key_file"])
            except ConfigError as e:
                raise SystemExit(f"mmogate: configuration error: {e}")
            print(public_key_b64(key))
            sys.exit(0)


class SigtermIsAStop(Service):
    """
    Makes SIGTERM a normal stop, with exit status 0.

    twistd re-raises the signal that stopped the reactor so that the process
    dies of it; a supervisor then records every rolling restart as a crash.
    A gate stops gracefully on SIGTERM, so it exits as after any clean stop.
    """

    def __init__(self, reactor):
        self._reactor = reactor

    def startService(self):
        Service.startService(self)
        self._reactor.callWhenRunning(self._install)

    def _install(self):
        signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame):
        self._reactor.callFromThread(self._reactor.stop)

    def stop(self):
        """
        Stop the process as SIGTERM does, from the reactor thread: a
        drained gate ends this way (exit status 0).
        """
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass


def makeService(options):
    from twisted.internet import reactor

    from gate.service import GateService
    top = MultiService()
    try:
        gate = GateService(options.gate_config, reactor)
    except ConfigError as e:  # encrypt.key_file unusable
        raise SystemExit(f"mmogate: configuration error: {e}")
    gate.setServiceParent(top)
    stopper = SigtermIsAStop(reactor)
    stopper.setServiceParent(top)
    gate.when_drained = stopper.stop
    return top
