"""
C{twistd mmogate}: options and wiring. Tests: C{tests/test_tap.py}.
"""

import sys

from twisted.python import usage

from gate.config import SCHEMA, ConfigError, load


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


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run an mmogate game gateway. Without --config it runs on "
                "loopback with an in-memory store and the bundled reference "
                "backend. The config file is TOML; --keys lists every key.")
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
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


def makeService(options):
    from gate.service import GateService
    return GateService(options.gate_config)
