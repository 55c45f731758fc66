"""
Structured logs: every event as one JSON object per line, carrying the
gate id and the event's named fields (C{session_id}, C{player_id}, ...).

Enabled with C{log.json_file}, or as twistd's only output with
C{twistd --logger gate.logs.json_observer}.
"""

import json
import sys

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer


#: The gate id of this process, set when a gate starts, for observers made
#: before the configuration was read (C{twistd --logger ...}).
_process = {"gate_id": None}


def set_gate_id(gate_id):
    _process["gate_id"] = gate_id


@implementer(ILogObserver)
class JSONLineObserver:
    """
    Writes each log event to C{stream} as a JSON line.
    """

    def __init__(self, stream, gate_id=None):
        self._stream = stream
        self._gate_id = gate_id

    def __call__(self, event):
        record = {"time": event.get("log_time"),
                  "level": getattr(event.get("log_level"), "name", None),
                  "ns": event.get("log_namespace"),
                  "msg": formatEvent(event)}
        gate_id = self._gate_id or _process["gate_id"]
        if gate_id is not None:
            record["gate_id"] = gate_id
        for key, value in event.items():
            if key.startswith("log_") or key in ("format", "message",
                                                 "system", "time", "isError"):
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        try:
            self._stream.write(json.dumps(record, default=str) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass


def json_observer():
    """
    A log observer factory for C{twistd --logger gate.logs.json_observer}.
    """
    return JSONLineObserver(sys.stdout)
