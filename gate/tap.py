"""
C{twistd mmogate}: options and wiring. Tests: C{tests/test_tap.py}.
"""

from twisted.python import usage

from gate.config import SCHEMA, ConfigError, load


def _keys_help():
    lines = ["Configuration keys (TOML tables, see README.md):"]
    for key in SCHEMA:
        default = "" if key.default in (None, "", []) else f" [{key.default}]"
        lines.append(f"  {key.name}{default}: {key.doc}")
    return "\n".join(lines)


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run an mmogate game gateway. Without --config it runs on "
                "loopback with an in-memory store and the bundled reference "
                "backend.\n\n" + _keys_help())
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
    ]

    def postOptions(self):
        try:
            self.gate_config = load(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}")


def makeService(options):
    from gate.service import GateService
    return GateService(options.gate_config)
