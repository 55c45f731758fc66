"""
One load process of the cluster proofs (C{bench.drain}, C{bench.killgate}):
real L{gate.client.GateClient}s, each following C{reconnect} and resuming
as a game would, that record what they are handed. Started by
L{bench.cluster}; not meant to be run by hand.

    python -m bench.proofload --mode drain|kill --gates '[[TCP, WS], ...]' \\
        --first K --count N --deadline S

C{drain}: client C{i} logs in to gate C{i % 2}. C{kill}: every client logs
in to gate 0 and is given both gates' addresses, so it goes on to gate 1
when gate 0 is gone. Every fifth client (C{--ws-every}) is on WebSocket.

Commands (stdin): C{final} (report every client), C{exit}. Events
(stdout, one JSON object a line): C{ready} once all are logged in,
C{s} (status, every 100 ms when it changed: clients bound, clients that
resumed since start, pushes handed), C{final}, C{deadline}.
"""

import argparse
import json
import os
import sys
import time

from twisted.internet import reactor, stdio
from twisted.internet.defer import DeferredSemaphore, gatherResults
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver

from gate.client import GateClient


class Tracked(GateClient):
    """
    A client that checks its persistent pushes as they are handed: each
    must be the seq after the last one (C{anomalies} counts any other);
    per connection, the gate must never write a seq at or below one it
    wrote there (C{disorder}). Times are wall clock (C{time.time()}), so
    the benchmark process can compare them with its own.
    """

    def __init__(self, worker, name, addrs, max_backoff):
        self.worker = worker
        self.name = name
        self.count = 0
        self.last = 0
        self.anomalies = 0
        self.disorder = 0
        self.overlap = 0
        self.gaps = 0
        self.kicks = []
        self.states = {}
        self.timeline = []
        self.codes = []
        self._per_link = {}
        GateClient.__init__(self, reactor, addrs if len(addrs) > 1
                            else addrs[0], login={"name": name},
                            on_push=self._handed, on_gap=self._gap,
                            on_kick=self._kick, on_state=self._state,
                            max_backoff=max_backoff, connect_timeout=60.0)

    def _gotPush(self, link, obj):
        # Before the client's own dedupe: what the gate wrote on this
        # connection.
        seq = obj.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq <= self._per_link.get(link, 0):
                self.disorder += 1
            else:
                self._per_link[link] = seq
            if seq <= self.last_seq:
                self.overlap += 1
        GateClient._gotPush(self, link, obj)

    def _handed(self, push):
        if push.seq is None:
            return
        if push.seq != self.last + 1:
            self.anomalies += 1
        self.last = max(self.last, push.seq)
        self.count += 1
        self.worker.handed += 1

    def _gap(self, first, last):
        self.gaps += 1

    def _kick(self, reason, msg):
        self.kicks.append(reason)

    def _state(self, state, info):
        now = time.time()
        self.states.setdefault(state, []).append(now)
        self.timeline.append((state, now))
        del self.timeline[:-10]
        if "code" in info:
            self.codes.append(f"{state}:{info['code']}")
        if state == "resumed":
            self.worker.resumed.add(self.name)
        if state == "closed":
            self.worker.closed += 1

    def report(self):
        def first(state):
            times = self.states.get(state)
            return times[0] if times else None

        return {"count": self.count, "last": self.last,
                "anomalies": self.anomalies, "disorder": self.disorder,
                "overlap": self.overlap, "gaps": self.gaps,
                "kicks": self.kicks, "connected": self.connected,
                "addr": str(self.address),
                "logged_in": len(self.states.get("logged_in", ())),
                "resume_failed": len(self.states.get("resume_failed", ())),
                "migrating": first("migrating"),
                "disconnected": first("disconnected"),
                "resumed": first("resumed"), "codes": self.codes[-5:],
                "timeline": self.timeline}


class Worker:
    def __init__(self, args, out):
        self.args = args
        self.out = out
        self.clients = {}
        self.resumed = set()
        self.handed = 0
        self.closed = 0
        self.exiting = False
        self._last_status = None
        gates = json.loads(args.gates)
        for i in range(args.first, args.first + args.count):
            ws = args.ws_every and i % args.ws_every == args.ws_every - 1
            transport = 1 if ws else 0

            def addr(gate):
                port = gate[transport]
                return f"ws://127.0.0.1:{port}/ws" if ws \
                    else f"tcp://127.0.0.1:{port}"

            if args.mode == "drain":
                addrs = [addr(gates[i % len(gates)])]
            else:
                addrs = [addr(gate) for gate in gates]
            name = f"proof{i}"
            self.clients[name] = Tracked(self, name, addrs, args.max_backoff)
        self.deadline = reactor.callLater(args.deadline, self._deadline)
        self.status = LoopingCall(self._status)

    def emit(self, obj):
        self.out.write(json.dumps(obj).encode("utf-8") + b"\n")

    def start(self):
        limit = DeferredSemaphore(self.args.concurrency)
        failed = []

        def one(client):
            d = client.connect()
            d.addErrback(lambda f: failed.append(
                f"{client.name}: {f.getErrorMessage()}"))
            return d

        started = time.time()
        d = gatherResults([limit.run(one, c) for c in self.clients.values()])

        def ready(_):
            self.emit({"ev": "ready", "logged_in": len(self.clients)
                       - len(failed), "failed": failed[:5],
                       "seconds": time.time() - started})
            self.status.start(0.1, now=True)

        d.addCallback(ready)

    def _status(self):
        now = (sum(1 for c in self.clients.values() if c.connected),
               len(self.resumed), self.handed, self.closed)
        if now != self._last_status:
            self._last_status = now
            self.emit({"ev": "s", "bound": now[0], "resumed": now[1],
                       "handed": now[2], "closed": now[3]})

    def command(self, cmd):
        name = cmd.get("cmd")
        if name == "final":
            self.emit({"ev": "final", "clients": {
                name: c.report() for name, c in self.clients.items()}})
        elif name == "exit":
            self.exit(0)

    def _deadline(self):
        self.deadline = None
        self.emit({"ev": "deadline"})
        self.exit(3)

    def exit(self, code):
        if self.exiting:
            return
        self.exiting = True
        self.code = code
        if self.status.running:
            self.status.stop()
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        d = gatherResults([c.close() for c in self.clients.values()])
        timer = reactor.callLater(2.0, reactor.stop)
        d.addBoth(lambda _: timer.active() and (timer.cancel(),
                                                reactor.stop()))


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
            self.worker.command(json.loads(line))

    def connectionLost(self, reason):
        if self.worker is not None and not self.worker.exiting:
            self.worker.exit(0)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.proofload")
    p.add_argument("--mode", choices=("drain", "kill"), required=True)
    p.add_argument("--gates", required=True,
                   help="JSON list of [tcp port, ws port], one per gate")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--ws-every", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--max-backoff", type=float, default=1.0)
    p.add_argument("--deadline", type=float, required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
