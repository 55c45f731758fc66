"""
One load process: many game clients on raw Twisted protocols, driven by the
benchmark over its standard input and reporting on its standard output, one
JSON object per line. Started by L{bench.harness}; not meant to be run by
hand.

    python -m bench.loadgen --role roundtrip|pushes --transport tcp|ws \\
        --host 127.0.0.1 --port P --first K --count N [--pipeline D] ...

Commands (stdin): C{go} (roundtrip: start requesting), C{mark} (start the
measured window: counters reset), C{snap} (report the window), C{stop}
(roundtrip: stop requesting and let in-flight requests finish), C{final}
(pushes: report every client's totals), C{exit}. Events (stdout): C{ready},
C{marked}, C{snap}, C{stopped}, C{final}, C{p} (pushes: running totals, for
the publisher's flow control), C{deadline}.

Every client is cheap on purpose: a 4-byte length prefix and C{orjson} over
TCP (autobahn for WebSocket, which the contract requires to be a real
WebSocket), no client library. The process exits by itself at C{--deadline}
seconds, or when its standard input closes.
"""

import argparse
import math
import os
import resource
import struct
import sys
import time
from collections import deque

try:
    from orjson import dumps as _dumps, loads
except ImportError:  # pragma: no cover - orjson is in the environment
    import json

    loads = json.loads

    def _dumps(obj):
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")

from twisted.internet import reactor, stdio
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver

_HEADER = struct.Struct(">I")
_pack = _HEADER.pack
_unpack_from = _HEADER.unpack_from
_clock = time.perf_counter

#: Histogram resolution: bucket k holds latencies in
#: [exp(k / RES), exp((k + 1) / RES)) microseconds, about 1 % wide.
RES = 100


def bucket(seconds):
    us = seconds * 1e6
    return int(math.log(us) * RES) if us >= 1.0 else 0


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ClientLogic:
    """
    What one client does, shared by the TCP and WebSocket protocol classes
    (mixed in, so a message costs no extra call through an adapter).
    """

    name = None
    logged_in = False
    #: Still counted among the worker's connecting clients.
    pending = True

    def opened(self):
        worker = self.worker
        self.index = worker.assign_index()
        self.name = f"bench{self.index}"
        worker.clients[self.name] = self
        self.inflight = deque()
        self.next_id = 2
        # Pushes: per-client persistent bookkeeping.
        self.expected = None
        self.persist = 0
        self.transient = 0
        self.dups = 0
        self.missing = 0
        self.gaps = 0
        self.acked = 0
        self.last_seq = 0
        self.login_sent = _clock()
        self.send(b'{"t":"login","id":1,"data":{"name":"%s"}}'
                  % self.name.encode("ascii"))

    def got(self, payload):
        worker = self.worker
        try:
            msg = loads(payload)
            t = msg["t"]
        except (ValueError, KeyError, TypeError):
            worker.count("bad_payload")
            return
        if t == "push":
            seq = msg.get("seq")
            if seq is None:
                self.transient += 1
                worker.transient += 1
                return
            expected = self.expected
            if expected is None:
                worker.count("push_before_login")
                return
            if seq == expected:
                self.expected = seq + 1
            elif seq < expected:
                self.dups += 1
                worker.count("duplicate_seq")
                return
            else:
                self.missing += seq - expected
                worker.count("missing_seq", seq - expected)
                self.expected = seq + 1
            self.persist += 1
            self.last_seq = seq
            worker.persist += 1
            if seq - self.acked >= worker.ack_every:
                self.acked = seq
                self.send(b'{"t":"ack","seq":%d}' % seq)
            return
        if t == "resp":
            rid = msg.get("id")
            if rid == 1 and not self.logged_in:
                self.logged_in = True
                last = msg.get("last_seq")
                self.expected = (last if isinstance(last, int) else 0) + 1
                if self.pending:
                    self.pending = False
                    worker.logged_in_one(self, _clock() - self.login_sent)
                return
            self._answered(rid, msg, None)
            return
        if t == "err":
            rid = msg.get("id")
            code = msg.get("code")
            if rid == 1 and not self.logged_in:
                worker.count(f"login_err:{code}")
                if self.pending:
                    self.pending = False
                    worker.login_failed(self)
                return
            if rid is None:
                worker.count(f"err:{code}")
                return
            self._answered(rid, msg, code)
            return
        if t == "ping":
            ts = msg.get("ts")
            self.send(_dumps({"t": "pong", "ts": ts}))
            return
        if t == "gap":
            self.gaps += 1
            worker.count("gap")
            return
        if t == "kick":
            worker.count(f"kick:{msg.get('reason')}")
            return
        if t == "pong":
            return
        worker.count(f"unexpected:{t}")

    def _answered(self, rid, msg, code):
        worker = self.worker
        inflight = self.inflight
        if not inflight:
            worker.count("resp_unasked")
            return
        sent_id, sent_at = inflight.popleft()
        if rid != sent_id:
            worker.count("resp_out_of_order")
        if code is not None:
            worker.count(f"err:{code}")
        else:
            if msg.get("data") != worker.echo_data:
                worker.count("bad_echo")
            worker.done += 1
            k = bucket(_clock() - sent_at)
            hist = worker.hist
            hist[k] = hist.get(k, 0) + 1
        if worker.requesting:
            self.request()

    def request(self):
        rid = self.next_id
        self.next_id = rid + 1
        self.inflight.append((rid, _clock()))
        self.send(b'{"t":"req","id":%d,"route":"echo","data":%s}'
                  % (rid, self.worker.echo_bytes))

    def closed(self, why):
        worker = self.worker
        if self.name is not None:
            worker.clients.pop(self.name, None)
            worker.gone[self.name] = self
        if not worker.exiting:
            worker.count("connection_lost")
            worker.lost_reasons[why] = worker.lost_reasons.get(why, 0) + 1
        if self.pending:
            # Lost before its login was answered (or, for WebSocket, before
            # the opening handshake finished).
            self.pending = False
            worker.login_failed(self)


class TCPClient(ClientLogic, Protocol):
    """
    The length-framed TCP transport of PROTOCOL.md section 1.
    """

    def connectionMade(self):
        self._buffer = b""
        self.opened()

    def send(self, payload):
        self.transport.write(_pack(len(payload)) + payload)

    def dataReceived(self, data):
        buffer = self._buffer + data if self._buffer else data
        offset = 0
        end = len(buffer)
        got = self.got
        while end - offset >= 4:
            (size,) = _unpack_from(buffer, offset)
            start = offset + 4
            if end - start < size:
                break
            got(buffer[start:start + size])
            offset = start + size
        self._buffer = buffer[offset:] if offset < end else b""

    def connectionLost(self, reason):
        self.closed(reason.type.__name__)


class TCPFactory(ClientFactory):
    noisy = False
    protocol = TCPClient

    def __init__(self, worker):
        self.worker = worker

    def buildProtocol(self, addr):
        p = TCPClient()
        p.worker = self.worker
        p.factory = self
        return p

    def clientConnectionFailed(self, connector, reason):
        self.worker.count(f"connect_failed:{reason.type.__name__}")
        self.worker.connect_failed()


def ws_classes():
    """
    The WebSocket client classes; autobahn is imported only when used.
    """
    from autobahn.twisted.websocket import (WebSocketClientFactory,
                                            WebSocketClientProtocol)

    class WSClient(ClientLogic, WebSocketClientProtocol):
        def onOpen(self):
            self.opened()

        def onMessage(self, payload, isBinary):
            self.got(payload)

        def send(self, payload):
            self.sendMessage(payload)

        def onClose(self, wasClean, code, reason):
            self.closed(f"ws_close:{code}")

    class WSFactory(WebSocketClientFactory):
        noisy = False
        protocol = WSClient

        def __init__(self, worker, url):
            WebSocketClientFactory.__init__(self, url)
            self.worker = worker
            self.setProtocolOptions(
                utf8validateIncoming=False, openHandshakeTimeout=30,
                closeHandshakeTimeout=2, autoPingInterval=0,
                maxMessagePayloadSize=0, maxFramePayloadSize=0)

        def buildProtocol(self, addr):
            p = WebSocketClientFactory.buildProtocol(self, addr)
            p.worker = self.worker
            return p

        def clientConnectionFailed(self, connector, reason):
            self.worker.count(f"connect_failed:{reason.type.__name__}")
            self.worker.connect_failed()

    return WSFactory


class Worker:
    """
    This process's clients, counters and the commands it obeys.
    """

    def __init__(self, args, out):
        self.args = args
        self.out = out
        self.ack_every = args.ack_every
        self.echo_data = "x" * args.payload
        self.echo_bytes = _dumps(self.echo_data)
        self.clients = {}
        self.gone = {}
        self.to_connect = args.count
        self.connecting = 0
        self.next_index = args.first
        self.ready_sent = False
        self.logged_in = 0
        self.failed_logins = 0
        self.login_latency = []
        self.requesting = False
        self.exiting = False
        self.errors = {}
        self.lost_reasons = {}
        self.persist = 0
        self.transient = 0
        self._reset_window()
        self._last_progress = None
        if args.transport == "tcp":
            self.factory = TCPFactory(self)
            self._connect = lambda: reactor.connectTCP(
                args.host, args.port, self.factory, timeout=30)
        else:
            url = f"ws://{args.host}:{args.port}/ws"
            self.factory = ws_classes()(self, url)
            self._connect = lambda: reactor.connectTCP(
                args.host, args.port, self.factory, timeout=30)
        self.deadline = reactor.callLater(args.deadline, self._deadline)
        self.progress = None
        if args.role == "pushes":
            self.progress = LoopingCall(self._report_progress)
            self.progress.start(0.01, now=False)

    def _reset_window(self):
        self.done = 0
        self.hist = {}
        self.window_errors_at = dict(self.errors)
        self.window_persist_at = getattr(self, "persist", 0)
        self.window_transient_at = getattr(self, "transient", 0)
        self.window_cpu_at = cpu_seconds()
        self.window_started = time.monotonic()

    def emit(self, obj):
        self.out.write(_dumps(obj) + b"\n")

    def count(self, what, n=1):
        self.errors[what] = self.errors.get(what, 0) + n

    # Connecting and logging in, at most --concurrency at a time.

    def start(self):
        self._fill()

    def _fill(self):
        while self.to_connect and self.connecting < self.args.concurrency:
            self.to_connect -= 1
            self.connecting += 1
            self._connect()
        self._check_ready()

    def assign_index(self):
        index = self.next_index
        self.next_index += 1
        return index

    def logged_in_one(self, client, latency):
        self.logged_in += 1
        self.login_latency.append(latency)
        self.connecting -= 1
        self._fill()

    def login_failed(self, client):
        self.failed_logins += 1
        self.connecting -= 1
        self._fill()

    def connect_failed(self):
        self.failed_logins += 1
        self.connecting -= 1
        self._fill()

    def _check_ready(self):
        if self.ready_sent or self.to_connect or self.connecting:
            return
        self.ready_sent = True
        lat = sorted(self.login_latency)
        self.emit({"ev": "ready", "logged_in": self.logged_in,
                   "failed": self.failed_logins,
                   "login_p50_ms": _pct(lat, 0.5) * 1e3,
                   "login_max_ms": (lat[-1] if lat else 0.0) * 1e3,
                   "errors": self.errors})

    # Commands.

    def command(self, cmd):
        name = cmd.get("cmd")
        if name == "go":
            self.requesting = True
            for client in list(self.clients.values()):
                if client.logged_in:
                    for _ in range(self.args.pipeline):
                        client.request()
        elif name == "mark":
            self._reset_window()
            self.emit({"ev": "marked"})
        elif name == "snap":
            self.emit(self._snapshot())
        elif name == "stop":
            self.requesting = False
            self._wait_idle(time.monotonic() + 10.0)
        elif name == "final":
            self.emit(self._final())
        elif name == "exit":
            self.exit(0)
        else:
            self.emit({"ev": "error", "msg": f"unknown command {name!r}"})

    def _snapshot(self):
        errors = {k: v - self.window_errors_at.get(k, 0)
                  for k, v in self.errors.items()
                  if v != self.window_errors_at.get(k, 0)}
        return {"ev": "snap",
                "seconds": time.monotonic() - self.window_started,
                "done": self.done,
                "hist": {str(k): v for k, v in self.hist.items()},
                "persist": self.persist - self.window_persist_at,
                "transient": self.transient - self.window_transient_at,
                "cpu": cpu_seconds() - self.window_cpu_at,
                "errors": errors,
                "errors_total": self.errors,
                "online": len(self.clients)}

    def _wait_idle(self, until):
        busy = sum(1 for c in self.clients.values() if c.inflight)
        if busy and time.monotonic() < until:
            reactor.callLater(0.01, self._wait_idle, until)
            return
        self.emit({"ev": "stopped", "still_inflight": busy,
                   "errors_total": self.errors,
                   "lost_reasons": self.lost_reasons})

    def _final(self):
        clients = {}
        for source in (self.gone, self.clients):
            for name, c in source.items():
                clients[name] = [c.persist, c.last_seq, c.dups, c.missing,
                                 c.gaps, c.transient,
                                 int(name in self.clients)]
        return {"ev": "final", "clients": clients, "errors_total": self.errors,
                "lost_reasons": self.lost_reasons}

    def _report_progress(self):
        now = (self.persist, self.transient)
        if now != self._last_progress:
            self._last_progress = now
            self.emit({"ev": "p", "n": now[0], "b": now[1]})

    def _deadline(self):
        self.deadline = None
        self.emit({"ev": "deadline"})
        self.exit(3)

    def exit(self, code):
        if self.exiting:
            return
        self.exiting = True
        self.requesting = False
        if self.progress is not None and self.progress.running:
            self.progress.stop()
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        for client in list(self.clients.values()):
            client.transport.loseConnection()
        self.code = code
        # Closing is best effort and bounded: the gate sees the connections
        # go within a fraction of a second; stop regardless after that.
        reactor.callLater(0.5, reactor.stop)


def _pct(values, q):
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


class Control(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, make_worker):
        self.make_worker = make_worker
        self.worker = None

    def connectionMade(self):
        self.worker = self.make_worker(self.transport)
        self.worker.start()

    def lineReceived(self, line):
        line = line.strip()
        if line:
            self.worker.command(loads(line))

    def connectionLost(self, reason):
        if self.worker is not None and not self.worker.exiting:
            self.worker.exit(0)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("--role", choices=("roundtrip", "pushes"), required=True)
    p.add_argument("--transport", choices=("tcp", "ws"), default="tcp")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--pipeline", type=int, default=1)
    p.add_argument("--payload", type=int, default=16)
    p.add_argument("--ack-every", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--deadline", type=float, required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.host != "127.0.0.1":
        raise SystemExit("the benchmark only drives 127.0.0.1")
    state = {}

    def make_worker(transport):
        state["worker"] = Worker(args, transport)
        return state["worker"]

    stdio.StandardIO(Control(make_worker))
    reactor.run()
    worker = state.get("worker")
    os._exit(getattr(worker, "code", 0) if worker is not None else 0)


if __name__ == "__main__":
    main()
