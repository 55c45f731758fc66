"""
C{mmogate-client}: talk to a gate from a terminal or a script.

    mmogate-client ADDR (--login JSON | --name NAME | --token JWT)
                   [--send ROUTE JSON ...] [--watch] [--json]
                   [--ca-file PEM] [--gate-key BASE64] [--no-reconnect]

It connects and binds, prints the C{resp}, sends each C{--send} in order
printing its reply, and exits; with C{--watch} it then prints pushes until
Ctrl-C or end of input. With neither, it reads C{ROUTE JSON} lines from
standard input, sending each as a request and printing replies and pushes
as they come, until end of input (outstanding replies are awaited).

Exit status: 0 on success; 1 when the connect or login failed (code and
message on stderr), a C{--send} request failed, or the gate ended the
session for good; 2 for bad arguments.
"""

import argparse
import json
import sys

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import react
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from gate.client.connection import GateClient
from gate.client.errors import GateError

def _dumps(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class Printer:
    """
    Renders what happens as lines: for people, or one JSON object per line
    with C{--json} (data on stdout, connection news on stderr either way).
    """

    def __init__(self, out, err, as_json=False):
        self.out = out
        self.err = err
        self.as_json = as_json

    def _line(self, stream, obj, text):
        stream((_dumps(obj) if self.as_json else text) + "\n")

    def resp(self, resp):
        obj = dict(resp)
        obj["t"] = "resp"
        self._line(self.out, obj,
                   f"bound as {resp.get('player_id')} (last_seq "
                   f"{resp.get('last_seq')}): {_dumps(resp.get('data'))}")

    def reply(self, route, data):
        self._line(self.out, {"t": "reply", "route": route, "data": data},
                   f"{route} -> {_dumps(data)}")

    def failure(self, route, error):
        obj = {"t": "err", "route": route, "code": error.code, "msg": error.msg}
        stream = self.out if self.as_json else self.err
        self._line(stream, obj, f"{route} failed: {error.code}: {error.msg}")

    def push(self, push):
        obj = {"t": "push", "route": push.route, "data": push.data,
               "ts": push.ts, "seq": push.seq}
        tag = f" #{push.seq}" if push.seq is not None else ""
        self._line(self.out, obj,
                   f"push {push.route}{tag}: {_dumps(push.data)}")

    def gap(self, first, last):
        self._line(self.out, {"t": "gap", "from": first, "to": last},
                   f"gap: pushes {first}..{last} were lost")

    def kick(self, reason, msg):
        self._line(self.err, {"t": "kick", "reason": reason, "msg": msg},
                   f"kicked: {reason}: {msg}")

    def state(self, state, info):
        obj = {"t": "state", "state": state}
        obj.update(info)
        details = " ".join(f"{k}={v}" for k, v in info.items())
        self._line(self.err, obj, f"* {state} {details}".rstrip())

    def error(self, text):
        self.err(f"error: {text}\n")


@implementer(IHalfCloseableProtocol)
class InputLines(LineReceiver):
    """
    Standard input and output. C{ROUTE JSON} lines become requests (when
    C{interactive}); C{eof} fires at end of input once their replies are
    in, and C{done} once output is flushed and closed (see L{finish}).

    Half-closeable so that replies can still be written after the input
    ends, as when a script pipes requests in.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1024 * 1024

    def __init__(self, client, printer, interactive):
        self.client = client
        self.printer = printer
        self.interactive = interactive
        self.eof = Deferred()
        self.done = Deferred()
        self._outstanding = set()
        self._ending = False

    def dataReceived(self, data):
        # When watching, input only matters for its end; not even buffered.
        if self.interactive:
            LineReceiver.dataReceived(self, data)

    def lineReceived(self, line):
        if self._ending:
            return
        text = line.decode("utf-8", "replace").strip()
        if not text or text.startswith("#"):
            return
        parts = text.split(None, 1)
        route = parts[0]
        try:
            data = json.loads(parts[1]) if len(parts) > 1 else None
        except ValueError as e:
            self.printer.error(f"not JSON after {route!r}: {e}")
            return
        d = self.client.request(route, data)
        self._outstanding.add(d)
        d.addCallbacks(lambda reply: self.printer.reply(route, reply),
                       lambda f: self._failed(route, f))
        d.addBoth(lambda _: self._outstanding.discard(d))

    def _failed(self, route, failure):
        if failure.check(GateError):
            self.printer.failure(route, failure.value)
        else:
            self.printer.error(f"{route}: {failure.getErrorMessage()}")

    def lineLengthExceeded(self, line):
        self.printer.error(f"input line over {self.MAX_LENGTH} bytes ignored")

    def write(self, text):
        if self.transport is not None and not self.done.called:
            self.transport.write(text.encode("utf-8"))

    def readConnectionLost(self):
        self._ended()

    def writeConnectionLost(self):
        self._ended()  # nowhere left to print

    def connectionLost(self, reason):
        self._ended()
        if not self.done.called:
            self.done.callback(None)

    def _ended(self):
        if self._ending:
            return
        self._ending = True
        DeferredList(list(self._outstanding), consumeErrors=True).addCallback(
            lambda _: self.eof.callback(None))

    def finish(self):
        """
        Flush and close standard output; the result fires when done.
        """
        if self.transport is not None and not self.done.called:
            self.transport.loseConnection()
        return self.done


def _parser():
    parser = argparse.ArgumentParser(
        prog="mmogate-client",
        description="Connect to an mmogate gate, log in, send requests "
                    "and print replies and pushes.")
    parser.add_argument("addr", metavar="ADDR",
                        help="tcp://host:port, tls://host:port, "
                             "ws://host:port/ws, wss://host:port/ws, "
                             "tcp+enc://host:port or host:port (TCP)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--login", metavar="JSON",
                     help="login data for the backend, as JSON")
    who.add_argument("--name", help='log in with {"name": NAME}')
    who.add_argument("--token", metavar="JWT",
                     help="bind with a signed token instead of logging in")
    parser.add_argument("--send", nargs=2, action="append", default=[],
                        metavar=("ROUTE", "JSON"),
                        help="send a request (repeatable; in order)")
    parser.add_argument("--watch", action="store_true",
                        help="keep printing pushes until Ctrl-C or EOF")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per line")
    parser.add_argument("--ca-file", metavar="PEM",
                        help="trust this CA for tls:// and wss://")
    parser.add_argument("--gate-key", metavar="BASE64",
                        help="for tcp+enc://: the gate's public key to pin "
                             "(twistd mmogate --public-key prints it)")
    parser.add_argument("--no-reconnect", action="store_true",
                        help="exit instead of reconnecting when dropped")
    return parser


def parse_args(argv=None):
    """
    Parse and check the command line, decoding its JSON arguments.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.login = json.loads(args.login) if args.login is not None else None
    except ValueError as e:
        parser.error(f"--login is not JSON: {e}")
    if args.name is not None:
        args.login = {"name": args.name}
    sends = []
    for route, text in args.send:
        try:
            sends.append((route, json.loads(text)))
        except ValueError as e:
            parser.error(f"--send {route}: not JSON: {e}")
    args.send = sends
    return args


async def run(reactor, args, out=None, err=None, stdio=None, **client_args):
    """
    Do what C{args} (from L{parse_args}) say; return the exit status.

    @param out: writes a string to standard output (default: C{sys.stdout}).
    @param err: the same for standard error.
    @param stdio: called with the L{InputLines} protocol to attach it to
        standard input (default: L{twisted.internet.stdio.StandardIO}).
    @param client_args: extra L{GateClient} arguments (for tests).
    """
    out = out or _writer(sys.stdout)
    err = err or _writer(sys.stderr)
    printer = Printer(out, err, args.json)
    closed = Deferred()

    def on_state(state, info):
        if state != "connecting":
            printer.state(state, info)
        if state == "closed" and not closed.called:
            closed.callback(info.get("code"))

    try:
        client = GateClient(reactor, args.addr, login=args.login,
                            token=args.token, on_push=printer.push,
                            on_gap=printer.gap, on_kick=printer.kick,
                            on_state=on_state,
                            reconnect=not args.no_reconnect,
                            ca_file=args.ca_file, gate_key=args.gate_key,
                            **client_args)
    except (ValueError, OSError) as e:
        printer.error(str(e))
        return 2
    try:
        resp = await client.connect()
    except GateError as e:
        printer.error(f"{e.code}: {e.msg}")
        return 1
    printer.resp(resp)
    # Ctrl-C stops the reactor; close first so delivered pushes are acked.
    shutting_down = []

    def on_shutdown():
        shutting_down.append(True)
        return client.close()

    trigger = reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    try:
        return await _session(reactor, client, printer, args, closed, stdio)
    finally:
        if trigger is not None and not shutting_down:
            reactor.removeSystemEventTrigger(trigger)
        await client.close()


async def _session(reactor, client, printer, args, closed, stdio):
    status = 0
    for route, data in args.send:
        try:
            printer.reply(route, await client.request(route, data))
        except GateError as e:
            printer.failure(route, e)
            status = 1
    if args.send and not args.watch:
        return status
    lines = InputLines(client, printer, interactive=not args.watch)
    if stdio is None:
        from twisted.internet.stdio import StandardIO

        def stdio(protocol):
            sys.stdout.flush()
            StandardIO(protocol, reactor=reactor)
    stdio(lines)
    # Output now goes through the stdio transport, which owns the fd.
    printer.out = lines.write
    first = Deferred()
    lines.eof.addCallback(lambda _: first.called or first.callback(None))
    closed.addCallback(lambda code: first.called or first.callback(code))
    code = await first
    await client.close()
    await lines.finish()
    if code is not None and code != "closed":
        return 1
    return status


def _writer(stream):
    def write(text):
        stream.write(text)
        stream.flush()
    return write


def main(argv=None):
    """
    The C{mmogate-client} console script.
    """
    args = parse_args(argv)

    async def _main(reactor):
        status = await run(reactor, args)
        if status:
            raise SystemExit(status)

    react(lambda reactor: ensureDeferred(_main(reactor)))


if __name__ == "__main__":
    main()
