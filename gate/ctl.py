"""
C{mmogatectl}: the operator's command line over a gate's push and admin API
(PROTOCOL.md section 5) and its metrics (section 6).

Readable aligned tables by default, C{--json} for scripts (the API's answer
as it came). Synchronous C{urllib}: one call per run needs no reactor.
Exit status: 0 done, 1 the API answered with an error, 2 bad usage, 3 the
API (or metrics listener) could not be reached or answered something that
is not JSON. Tests: C{tests/test_ctl.py}.
"""

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_API = "http://127.0.0.1:8090"
DEFAULT_METRICS = "http://127.0.0.1:9090"
#: The key of a gate started without a config file.
DEFAULT_KEY = "dev-api-key"
KEY_ENV = "MMOGATE_API_KEY"

EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: Request outcomes that are the backend's fault, as counted in
#: C{mmogate_requests_total}.
BACKEND_ERRORS = ("backend_unavailable", "backend_timeout", "backend_error")

#: Columns shown first in C{history}, when the records have them.
HISTORY_COLUMNS = ("ts", "time", "event", "kind", "player_id", "session_id",
                   "gate_id", "peer", "reason")


class CtlError(Exception):
    """
    A one-line failure for people, with the exit status it warrants.
    """

    def __init__(self, msg, status=EXIT_API):
        Exception.__init__(self, msg)
        self.status = status


class Client:
    """
    Calls to one gate: its API at C{api} with C{key}, its metrics at
    C{metrics}. Talks to the gate directly, never through an HTTP proxy.
    """

    def __init__(self, api, key, metrics, timeout):
        self.api = api.rstrip("/")
        self.key = key
        self.metrics = metrics.rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}))

    def call(self, method, path, body=None, query=None):
        """
        @return: the parsed JSON answer of a 2xx.
        @raise CtlError: for anything else.
        """
        url = self.api + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": f"Bearer {self.key}",
                   "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = _request(url, data, headers, method)
        what = f"{method} {path}"
        status, raw = self._fetch(request, what, self.api, "API")
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if 200 <= status < 300:
            if answer is None:
                raise CtlError(f"{what}: the API answered {status} with "
                               f"something that is not JSON",
                               EXIT_UNREACHABLE)
            if not isinstance(answer, dict):
                raise CtlError(f"{what}: the answer is not a JSON object; is "
                               f"{self.api} a gate's API?", EXIT_UNREACHABLE)
            return answer
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict):
            raise CtlError(f"{what}: {status} {error.get('code')}: "
                           f"{error.get('msg')}")
        text = raw[:200].decode("utf-8", "replace").strip()
        raise CtlError(f"{what}: {status} {text or '(no body)'}")

    def scrape(self):
        """
        @return: the text of C{/metrics}.
        """
        request = _request(self.metrics + "/metrics")
        status, raw = self._fetch(request, "GET /metrics", self.metrics,
                                  "metrics listener")
        if status != 200:
            raise CtlError(f"GET /metrics: {status}", EXIT_UNREACHABLE)
        return raw.decode("utf-8", "replace")

    def _fetch(self, request, what, base, name):
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()
        except urllib.error.URLError as e:
            reason = e.reason
            raise CtlError(f"cannot reach the {name} at {base}: "
                           f"{getattr(reason, 'strerror', None) or reason}",
                           EXIT_UNREACHABLE)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise CtlError(f"cannot reach the {name} at {base}: "
                           f"{e or type(e).__name__}", EXIT_UNREACHABLE)


def _request(url, data=None, headers=None, method=None):
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise CtlError(f"bad URL {url!r}: give http://host:port or "
                       f"https://host:port", EXIT_USAGE)
    try:
        return urllib.request.Request(url, data, headers or {}, method=method)
    except ValueError as e:
        raise CtlError(f"bad URL {url!r}: {e}", EXIT_USAGE)


# Formatting.

def table(headers, rows):
    """
    Lines of aligned columns, headers first; the last column is not padded.
    """
    rows = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = []
    for row in [list(headers)] + rows:
        cells = [value.ljust(widths[i]) for i, value in enumerate(row[:-1])]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    return lines


def pairs(items):
    """
    Lines of C{name  value}, names aligned.
    """
    items = [(name, _cell(value)) for name, value in items]
    width = max((len(name) for name, _ in items), default=0)
    return [f"{name.ljust(width)}  {value}".rstrip() for name, value in items]


def _cell(value):
    if value is None:
        return "-"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def utc(ts):
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))
    except (OverflowError, ValueError, OSError, TypeError):
        return str(ts)


def age(seconds):
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


# Commands: each returns (answer for --json, lines for people).

def cmd_sessions(client, args):
    answer = client.call("GET", "/v1/sessions")
    sessions = answer.get("sessions") or []
    now = time.time()
    rows = [(s.get("session_id"), s.get("player_id"), s.get("transport"),
             s.get("peer"), utc(s.get("since")),
             age(now - s["since"]) if isinstance(s.get("since"), (int, float))
             else None)
            for s in sorted(sessions, key=lambda s: (s.get("since") or 0))]
    lines = table(("SESSION", "PLAYER", "TRANSPORT", "PEER", "SINCE (UTC)",
                   "AGE"), rows)
    lines.append(f"{len(sessions)} session{'s' if len(sessions) != 1 else ''}")
    return answer, lines


def cmd_player(client, args):
    answer = client.call("GET", "/v1/players/"
                         + urllib.parse.quote(args.player_id, safe=""))
    order = ("player_id", "online", "gate_id", "session_id", "last_seq",
             "mailbox")
    items = [(k, answer.get(k)) for k in order if k in answer]
    items += [(k, v) for k, v in answer.items() if k not in order]
    return answer, pairs(items)


def cmd_kick(client, args):
    body = {"player_id": args.player_id}
    if args.reason is not None:
        body["reason"] = args.reason
    if args.ban is not None:
        body["ban_seconds"] = args.ban
    answer = client.call("POST", "/v1/kick", body)
    if answer.get("kicked"):
        line = f"kicked {args.player_id}"
    else:
        line = f"{args.player_id} has no session on this gate: nobody kicked"
    if args.ban is not None:
        line += f"; banned for {_cell(args.ban)} s"
    return answer, [line]


def cmd_push(client, args):
    body = {"players": args.player_ids, "route": args.route,
            "data": args.data, "persist": not args.transient}
    answer = client.call("POST", "/v1/push", body)
    items = [(k, answer.get(k)) for k in ("delivered", "queued", "dropped")]
    unknown = answer.get("unknown") or []
    items.append(("unknown", ", ".join(map(str, unknown)) if unknown
                  else 0))
    return answer, pairs(items)


def _target(args):
    body = {"addr": args.addr}
    if args.addr_for:
        body["addrs"] = dict(args.addr_for)
    return body


def cmd_reconnect(client, args):
    body = _target(args)
    if args.all:
        body["all"] = True
    else:
        body["player_id"] = args.player_id
    answer = client.call("POST", "/v1/reconnect", body)
    sent = answer.get("sent")
    who = "session" if sent == 1 else "sessions"
    lines = [f"reconnect to {args.addr}: {sent} {who}"]
    if args.all and sent:
        lines[0] += " (spread over drain.jitter seconds)"
    return answer, lines


def cmd_drain(client, args):
    body = _target(args)
    if args.deadline is not None:
        body["deadline"] = args.deadline
    answer = client.call("POST", "/v1/drain", body)
    deadline = (f"{_cell(args.deadline)} s" if args.deadline is not None
                else "drain.deadline")
    return answer, [f"draining to {args.addr}: new clients are refused; the "
                    f"gate stops once empty or after {deadline}"]


def cmd_history(client, args):
    query = {}
    if args.player is not None:
        query["player_id"] = args.player
    if args.session is not None:
        query["session_id"] = args.session
    if args.limit is not None:
        query["limit"] = args.limit
    answer = client.call("GET", "/v1/history", query=query)
    records = _records(answer)
    columns = [c for c in HISTORY_COLUMNS
               if any(c in r for r in records)]
    for record in records:
        for key in record:
            if key not in columns:
                columns.append(key)
    rows = [[utc(r[c]) if c in ("ts", "time")
             and isinstance(r.get(c), (int, float)) else r.get(c)
             for c in columns] for r in records]
    lines = table([c.upper() for c in columns], rows) if columns else []
    lines.append(f"{len(records)} record{'s' if len(records) != 1 else ''}")
    return answer, lines


def _records(answer):
    """
    The list of records in a history answer (C{{"<name>": [...]}}).
    """
    if isinstance(answer, list):
        found = answer
    else:
        found = next((v for v in answer.values() if isinstance(v, list)), [])
    return [r for r in found if isinstance(r, dict)]


def samples(text):
    """
    C{(name, labels, value)} of every sample in Prometheus text.
    """
    try:
        return [(s.name, s.labels, s.value)
                for family in text_string_to_metric_families(text)
                for s in family.samples]
    except ValueError as e:
        raise CtlError(f"GET /metrics: not Prometheus text: {e}",
                       EXIT_UNREACHABLE)


def summarise(found):
    """
    The key figures of a gate's metrics, as a dict for C{--json}.
    """
    def by(name, label):
        out = {}
        for sample, labels, value in found:
            if sample == name:
                key = labels.get(label, "")
                out[key] = out.get(key, 0) + value
        return {k: _number(v) for k, v in sorted(out.items())}

    def one(name):
        for sample, labels, value in found:
            if sample == name:
                return _number(value)
        return None

    state = [s for s, v in by("mmogate_gate_state", "state").items() if v]
    requests = by("mmogate_requests_total", "outcome")
    return {
        "state": state[0] if state else None,
        "sessions": by("mmogate_sessions", "transport"),
        "players": by("mmogate_players", "state"),
        "requests": {"total": _number(sum(requests.values())),
                     "by_outcome": requests},
        "backend_errors": {k: requests.get(k, 0) for k in BACKEND_ERRORS},
        "pushes": by("mmogate_pushes_total", "outcome"),
        "mailbox_messages": one("mmogate_mailbox_messages"),
        "reconnects": by("mmogate_reconnects_total", "reason"),
        "kicks": by("mmogate_kicks_total", "reason"),
        "workers": {"size": one("mmogate_workers"),
                    "busy": one("mmogate_workers_busy"),
                    "queue": one("mmogate_worker_queue")},
    }


def _number(value):
    return int(value) if float(value).is_integer() else value


def _counts(counts, total=False):
    if not counts:
        return "0"
    text = ", ".join(f"{k} {_cell(v)}" for k, v in counts.items())
    if total:
        text += f" (total {_cell(_number(sum(counts.values())))})"
    return text


def cmd_stats(client, args):
    summary = summarise(samples(client.scrape()))
    requests = summary["requests"]
    ok = requests["by_outcome"].get("ok", 0)
    workers = summary["workers"]
    lines = pairs([
        ("gate state", summary["state"]),
        ("sessions", _counts(summary["sessions"], total=True)),
        ("players", _counts(summary["players"])),
        ("requests", f"{requests['total']} (ok {ok}, errors "
                     f"{_number(requests['total'] - ok)})"),
        ("backend errors", _counts(summary["backend_errors"])),
        ("pushes", _counts(summary["pushes"])),
        ("mailbox messages", summary["mailbox_messages"]),
        ("reconnects sent", _counts(summary["reconnects"])),
        ("kicks", _counts(summary["kicks"])),
        ("workers", f"{workers['busy']} busy of {workers['size']}, "
                    f"{workers['queue']} queued"),
    ])
    return summary, lines


# The command line.

def _json_data(text):
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}")


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number >= 0")
    return int(value) if value.is_integer() else value


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _transport_addr(text):
    transport, sep, addr = text.partition("=")
    if not sep or not transport or not addr:
        raise argparse.ArgumentTypeError("give TRANSPORT=ADDR, such as "
                                         "ws=wss://b.example/ws")
    return transport, addr


def parser():
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after the command, without one resetting
    # the other.
    common.add_argument("--api", default=argparse.SUPPRESS, metavar="URL",
                        help=f"the gate's API (default {DEFAULT_API})")
    common.add_argument("--key", default=argparse.SUPPRESS,
                        help=f"API key (default: ${KEY_ENV}, else "
                             f"{DEFAULT_KEY})")
    common.add_argument("--metrics", default=argparse.SUPPRESS, metavar="URL",
                        help=f"the gate's metrics listener, for stats "
                             f"(default {DEFAULT_METRICS})")
    common.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS,
                        help="print the answer as JSON, for scripts")
    common.add_argument("--timeout", type=_seconds, default=argparse.SUPPRESS,
                        help="seconds to wait for an answer (default 10)")
    top = argparse.ArgumentParser(
        prog="mmogatectl", parents=[common],
        description="Operate an mmogate gate through its admin API.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND",
                                  required=True)

    def command(name, run, help):
        sub = commands.add_parser(name, parents=[common], help=help,
                                  description=help)
        sub.set_defaults(run=run)
        return sub

    command("sessions", cmd_sessions, "list the sessions on the gate")
    sub = command("player", cmd_player, "show one player")
    sub.add_argument("player_id", metavar="ID")
    sub = command("kick", cmd_kick, "kick a player's session, and ban it")
    sub.add_argument("player_id", metavar="ID")
    sub.add_argument("--reason", help="text the client is shown")
    sub.add_argument("--ban", type=_seconds, metavar="SECONDS",
                     help="also refuse the player's logins this long")
    sub = command("push", cmd_push, "push a message to players")
    sub.add_argument("player_ids", metavar="ID", nargs="+")
    sub.add_argument("--route", required=True)
    sub.add_argument("--data", type=_json_data, default=None, metavar="JSON")
    sub.add_argument("--transient", action="store_true",
                     help="no seq, not queued for offline players")
    for name, run, help in (
            ("reconnect", cmd_reconnect,
             "tell a player's session (or every session) to move to ADDR"),
            ("drain", cmd_drain,
             "move every session to ADDR, refuse new ones, then stop")):
        sub = command(name, run, help)
        if name == "reconnect":
            sub.add_argument("player_id", metavar="ID", nargs="?")
            sub.add_argument("--all", action="store_true",
                             help="every session of this gate")
        else:
            sub.add_argument("--deadline", type=_seconds, metavar="SECONDS",
                             help="stop by then (default drain.deadline)")
        sub.add_argument("--addr", required=True,
                         help="host:port, or a ws:// or wss:// URL")
        sub.add_argument("--addr-for", type=_transport_addr, action="append",
                         metavar="TRANSPORT=ADDR",
                         help="another address for the sessions of one "
                              "transport (tcp, ws, ...); repeatable")
    sub = command("history", cmd_history,
                  "session history from the audit log")
    sub.add_argument("--player", metavar="ID")
    sub.add_argument("--session", metavar="ID")
    sub.add_argument("--limit", type=_positive, metavar="N")
    command("stats", cmd_stats, "key figures from the gate's metrics")
    return top


def main(argv=None, stdout=None, stderr=None, environ=None):
    """
    Run one command; return the exit status.
    """
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    environ = environ if environ is not None else os.environ
    top = parser()
    try:
        args = top.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command == "reconnect" and args.all == (args.player_id
                                                     is not None):
        stderr.write(f"{top.prog} reconnect: give either a player ID or "
                     f"--all\n")
        return EXIT_USAGE
    client = Client(getattr(args, "api", DEFAULT_API),
                    getattr(args, "key", None) or environ.get(KEY_ENV)
                    or DEFAULT_KEY,
                    getattr(args, "metrics", DEFAULT_METRICS),
                    getattr(args, "timeout", 10))
    try:
        answer, lines = args.run(client, args)
    except CtlError as e:
        stderr.write(f"{top.prog}: {e}\n")
        return e.status
    if getattr(args, "json", False):
        stdout.write(json.dumps(answer, indent=2) + "\n")
    else:
        stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
