"""
Push fan-out through a gate: the push API (C{POST /v1/push},
C{POST /v1/broadcast}) to many reading clients.

    python -m bench.pushes [--clients 1000] [--seconds 10] [--mode both]
                           [--batch 100] [--transport tcp|ws] [--procs 1]
                           [--json FILE]

Starts the reference backend and a gate as C{bench.roundtrip} does; the load
processes log C{--clients} clients in and then only read (and C{ack} every
C{--ack-every} persistent pushes, and answer the gate's C{ping}). This
process publishes as fast as the gate keeps up: C{--http-conns} keep-alive
connections to the push API, each sending its next call when the previous
one is answered, and no more than C{--window} pushes sent but not yet read
by the clients (the clients report what they read every 20 ms), so what is
measured is delivery to the clients, not buffering in the gate.

C{--mode push}: persistent pushes to batches of C{--batch} players in turn;
C{broadcast}: broadcasts to all; C{both}: both, balanced by delivered
messages. Reported: pushes delivered per second (counted at the clients),
gate CPU per delivered push (comparable with PERF-NOTES.md), and a delivery
check: every client's persistent pushes must be seq 1, 2, ... with no gap
and no duplicate, as many as the push API said it delivered to that player,
and every client must have every broadcast.
"""

import argparse
import json
import sys
import time

from twisted.internet import defer
from twisted.internet.task import deferLater

from bench import harness, httpc
from bench.harness import HOST, BenchError, us


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench.pushes",
        description="Pushes delivered per second and gate CPU per delivered "
        "push, through a gate's push API to many clients on 127.0.0.1.")
    harness.add_common_args(parser, clients=1000)
    parser.add_argument("--mode", choices=("push", "broadcast", "both"),
                        default="both",
                        help="what to publish (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=100,
                        help="players per POST /v1/push (default: "
                        "%(default)s)")
    parser.add_argument("--payload", type=int, default=32,
                        help="length of the string pushed as data (default: "
                        "%(default)s)")
    parser.add_argument("--http-conns", type=int, default=2,
                        help="push API connections, one call in flight each "
                        "(default: %(default)s)")
    parser.add_argument("--window", type=int, default=0,
                        help="most pushes sent but not yet read by the "
                        "clients (default: 10 x clients, at least 20000)")
    parser.add_argument("--ack-every", type=int, default=50,
                        help="each client acks after this many persistent "
                        "pushes (default: %(default)s)")
    args = parser.parse_args(argv)
    harness.check_common_args(parser, args)
    if not 1 <= args.batch <= 10000:
        parser.error("--batch must be in [1, 10000]")
    if not 1 <= args.http_conns <= 64:
        parser.error("--http-conns must be in [1, 64]")
    if not 0 <= args.payload <= 60000:
        parser.error("--payload must be in [0, 60000]")
    if args.window < 0:
        parser.error("--window must be at least 0")
    if not 1 <= args.ack_every <= 1000:
        parser.error("--ack-every must be in [1, 1000] (the gate keeps "
                     "player.mailbox_max, default 1000, unacked pushes)")
    if not args.window:
        args.window = max(10 * args.clients, 20000)
    return args


def sleep(reactor, seconds):
    return deferLater(reactor, seconds, lambda: None)


class Publisher:
    """
    Calls the push API as fast as the clients read what it sends, within
    C{window} pushes in transit; counts what the API says it did.
    """

    #: Reconnections to the push API allowed in one run before giving up.
    max_reconnects = 5

    def __init__(self, reactor, run, args, names):
        self.reactor = reactor
        self.run = run
        self.mode = args.mode
        self.window = args.window
        self.names = names
        self.clients = len(names)
        self.conns = []
        self.running = False
        self.auth = b"Authorization: Bearer " + run.api_key.encode("ascii")
        data = "x" * args.payload
        self.batches = []
        for start in range(0, len(names), args.batch):
            players = names[start:start + args.batch]
            body = json.dumps({"players": players, "route": "bench",
                               "data": data}).encode("utf-8")
            self.batches.append((players, body))
        self.broadcast_body = json.dumps({"route": "bench.all",
                                          "data": data}).encode("utf-8")
        self.next_batch = 0
        # Pushes that should reach clients: planned when sent, corrected by
        # the answer's "delivered".
        self.committed = 0
        self.planned = {"push": 0, "broadcast": 0}
        self.calls = {"push": 0, "broadcast": 0}
        self.delivered = {"push": 0, "broadcast": 0}
        self.api_time = {"push": 0.0, "broadcast": 0.0}
        self.per_player = dict.fromkeys(names, 0)
        self.uncertain = set()
        self.broadcast_counts = []
        self.errors = {}
        self.reconnects = 0
        self.inflight = 0
        self._idle = None

    def error(self, what):
        self.errors[what] = self.errors.get(what, 0) + 1

    @defer.inlineCallbacks
    def connect(self, n):
        for _ in range(n):
            conn = yield httpc.connect(self.reactor, HOST, self.run.api_port,
                                       timeout=30)
            self.conns.append(conn)

    def start(self):
        self.running = True
        self.run.on_progress = self.pump
        self.pump()

    def stop(self):
        """
        Send nothing more; the L{Deferred} fires once no call is in flight.
        """
        self.running = False
        if not self.inflight:
            return defer.succeed(None)
        self._idle = defer.Deferred()
        return self._idle

    def received(self):
        persist, transient = self.run.progress()
        return persist + transient

    def _next_kind(self):
        if self.mode != "both":
            return self.mode
        planned = self.planned
        return "broadcast" if planned["broadcast"] <= planned["push"] \
            else "push"

    def pump(self):
        if not self.running:
            return
        for i, conn in enumerate(self.conns):
            if conn.busy:
                continue
            if conn.lost:
                self._replace(i)
                continue
            in_transit = self.committed - self.received()
            kind = self._next_kind()
            if kind == "push":
                players, body = self.batches[self.next_batch]
                planned = len(players)
            else:
                players, body = None, self.broadcast_body
                planned = self.clients
            if in_transit > 0 and in_transit + planned > self.window:
                return
            if kind == "push":
                self.next_batch = (self.next_batch + 1) % len(self.batches)
            self.committed += planned
            self.planned[kind] += planned
            self.inflight += 1
            path = "/v1/push" if kind == "push" else "/v1/broadcast"
            started = time.monotonic()
            d = conn.request("POST", path, body,
                             (self.auth, b"Content-Type: application/json"))
            d.addCallbacks(self._answered, self._failed,
                           callbackArgs=(kind, players, planned, started),
                           errbackArgs=(kind, players, planned))
            d.addErrback(self._bug)

    def _replace(self, i):
        if self.reconnects >= self.max_reconnects:
            if self.running:
                self.error("gave_up_reconnecting")
                self.running = False
                self._maybe_idle()
            return
        self.reconnects += 1
        self.conns[i] = _Placeholder()

        def connected(conn):
            self.conns[i] = conn
            self.pump()

        def failed(f):
            self.error(f"reconnect_failed:{f.getErrorMessage()}")
            self.conns[i] = _Placeholder(lost=True)

        httpc.connect(self.reactor, HOST, self.run.api_port, timeout=30) \
            .addCallbacks(connected, failed)

    def _answered(self, answer, kind, players, planned, started):
        self.inflight -= 1
        status, body = answer
        self.api_time[kind] += time.monotonic() - started
        try:
            result = json.loads(body) if status == 200 else None
        except ValueError:
            result = None
        if result is None:
            self.error(f"{kind}_http_{status}")
            self.committed -= planned
            if players:
                self.uncertain.update(players)
        else:
            delivered = result.get("delivered", 0)
            self.calls[kind] += 1
            self.delivered[kind] += delivered
            self.committed += delivered - planned
            if kind == "push":
                if delivered == len(players) and not result.get("queued") \
                        and not result.get("unknown") \
                        and not result.get("dropped"):
                    for name in players:
                        self.per_player[name] += 1
                else:
                    self.error("push_not_all_delivered")
                    self.uncertain.update(players)
            else:
                self.broadcast_counts.append(delivered)
        self._maybe_idle()
        self.pump()

    def _failed(self, failure, kind, players, planned):
        self.inflight -= 1
        self.error(f"{kind}_failed:{failure.getErrorMessage()}")
        # The gate may or may not have sent it.
        self.committed -= planned
        if players:
            self.uncertain.update(players)
        self._maybe_idle()
        self.pump()

    def _maybe_idle(self):
        if not self.inflight and self._idle is not None \
                and not self._idle.called:
            self._idle.callback(None)

    def _bug(self, failure):
        self.error(f"publisher_bug:{failure.getErrorMessage()}")
        failure.printTraceback()

    def snapshot(self):
        return {"calls": dict(self.calls), "delivered": dict(self.delivered),
                "api_time": dict(self.api_time)}

    def close(self):
        for conn in self.conns:
            if hasattr(conn, "close"):
                conn.close()


class _Placeholder:
    """
    A connection slot being reconnected.
    """

    busy = True

    def __init__(self, lost=False):
        self.lost = lost
        if lost:
            self.busy = False


def check_delivery(finals, publisher, logged_in):
    """
    Compare what each client read with what the push API said it
    delivered. @return: C{(ok, text lines, details dict)}.
    """
    clients = {}
    for f in finals:
        clients.update(f["clients"])
    lines = []
    problems = {"duplicates": 0, "missing_in_seq": 0, "gap_notices": 0,
                "persist_short": 0, "persist_extra": 0,
                "clients_wrong_persist": 0, "broadcast_short": 0,
                "broadcast_extra": 0, "clients_wrong_broadcast": 0,
                "clients_gone": 0}
    broadcasts = publisher.broadcast_counts
    full_broadcasts = all(n == logged_in for n in broadcasts)
    expect_broadcast = len(broadcasts)
    checked = 0
    for name, (persist, last_seq, dups, missing, gaps, transient,
               online) in clients.items():
        problems["duplicates"] += dups
        problems["missing_in_seq"] += missing
        problems["gap_notices"] += gaps
        if not online:
            problems["clients_gone"] += 1
        if name not in publisher.uncertain:
            checked += 1
            want = publisher.per_player.get(name, 0)
            if persist != want or last_seq != want:
                problems["clients_wrong_persist"] += 1
                problems["persist_short"] += max(0, want - persist)
                problems["persist_extra"] += max(0, persist - want)
        if full_broadcasts and transient != expect_broadcast:
            problems["clients_wrong_broadcast"] += 1
            problems["broadcast_short"] += max(0, expect_broadcast - transient)
            problems["broadcast_extra"] += max(0, transient - expect_broadcast)
    ok = not any(problems.values()) and len(clients) == logged_in
    persist_total = sum(publisher.per_player.values())
    if ok:
        parts = []
        if persist_total:
            parts.append(f"exactly the persistent pushes the API reported "
                         f"delivered to it ({persist_total} in all), seq "
                         f"1..n without gap or duplicate")
        if expect_broadcast:
            parts.append(f"all {expect_broadcast} broadcasts once")
        lines.append(f"delivery check     OK: each of {checked} clients read "
                     + " and ".join(parts or ["nothing (nothing was sent)"]))
    else:
        lines.append("delivery check     FAILED: " + ", ".join(
            f"{k} {v}" for k, v in problems.items() if v)
            + f" (clients reporting {len(clients)} of {logged_in})")
    if publisher.uncertain:
        lines.append(f"                   {len(publisher.uncertain)} players "
                     f"not checked: an API call for them failed or was not "
                     f"fully delivered")
    if not full_broadcasts:
        lines.append(f"                   broadcasts reached "
                     f"{min(broadcasts)}..{max(broadcasts)} sessions, not "
                     f"always {logged_in}: per-client broadcast counts not "
                     f"checked")
    return ok, lines, problems


@defer.inlineCallbacks
def main(reactor, run):
    args = run.args
    print(f"pushes: {args.clients} clients over {args.transport}, mode "
          f"{args.mode}, batch {args.batch}, window {args.window}, "
          f"{args.http_conns} API connection(s), {args.procs} load "
          f"process(es), warm-up {args.warmup:g}s, measuring "
          f"{args.seconds:g}s; revision {harness.revision()}", flush=True)
    yield run.start_stack()
    print(f"backend pid {run.backend.pid} on :{run.backend_port}, gate pid "
          f"{run.gate.pid} (tcp :{run.tcp_port}, ws :{run.ws_port}, "
          f"api :{run.api_port})", flush=True)
    deadline = 120 + args.clients / 20 + args.warmup + args.seconds + 90
    ready = yield run.start_workers(
        "pushes", args.transport, args.clients, args.procs, deadline,
        extra=["--ack-every", str(args.ack_every)])
    logged_in = sum(r["logged_in"] for r in ready)
    failed = sum(r["failed"] for r in ready)
    print(f"logged in: {logged_in} of {args.clients} (failed {failed}); "
          f"login p50 {max(r['login_p50_ms'] for r in ready):.1f} ms, "
          f"max {max(r['login_max_ms'] for r in ready):.1f} ms", flush=True)
    if failed or not logged_in:
        raise BenchError(f"{failed} clients could not log in: "
                         + str([r["errors"] for r in ready]))

    names = [f"bench{i}" for i in range(args.clients)]
    publisher = Publisher(reactor, run, args, names)
    yield publisher.connect(args.http_conns)
    publisher.start()
    yield sleep(reactor, args.warmup)
    before = run.cpu_sample()
    pub_before = publisher.snapshot()
    yield run.command("mark", "marked")
    yield sleep(reactor, args.seconds)
    after = run.cpu_sample()
    pub_after = publisher.snapshot()
    snaps = yield run.command("snap", "snap")

    # Drain: no more calls; wait until the clients read all that was sent.
    stopped = yield harness._within(reactor, publisher.stop(), 30)
    drain_until = time.monotonic() + 20
    while publisher.received() < publisher.committed \
            and time.monotonic() < drain_until:
        yield sleep(reactor, 0.05)
    in_transit = publisher.committed - publisher.received()
    # Progress is reported every 20 ms; let the last reports and acks land.
    yield sleep(reactor, 0.2)
    finals = yield run.command("final", "final", timeout=30)
    publisher.close()

    cpu = run.cpu_delta(before, after)
    wall = cpu["wall"]
    persist = sum(s["persist"] for s in snaps)
    transient = sum(s["transient"] for s in snaps)
    delivered = persist + transient
    errors = {}
    for f in finals:
        for k, v in f["errors_total"].items():
            errors[k] = errors.get(k, 0) + v
    lost_reasons = {}
    for f in finals:
        for k, v in f["lost_reasons"].items():
            lost_reasons[k] = lost_reasons.get(k, 0) + v
    calls = {k: pub_after["calls"][k] - pub_before["calls"][k]
             for k in ("push", "broadcast")}
    api_time = {k: pub_after["api_time"][k] - pub_before["api_time"][k]
                for k in ("push", "broadcast")}

    def per(x):
        return None if x is None or not delivered else x / delivered

    ok, check_lines, problems = check_delivery(finals, publisher, logged_in)
    result = {
        "benchmark": "pushes", "revision": harness.revision(),
        "mode": args.mode, "clients": args.clients, "logged_in": logged_in,
        "transport": args.transport, "batch": args.batch,
        "payload": args.payload, "window": args.window,
        "http_conns": args.http_conns, "procs": args.procs,
        "seconds": wall, "warmup": args.warmup,
        "delivered": delivered, "delivered_per_second": delivered / wall,
        "persistent_delivered": persist,
        "persistent_per_second": persist / wall,
        "broadcast_delivered": transient,
        "broadcast_per_second": transient / wall,
        "api_calls": calls,
        "api_mean_latency_s": {
            k: (api_time[k] / calls[k] if calls[k] else None) for k in calls},
        "gate_cpu_per_delivered_s": per(cpu["gate"]),
        "backend_cpu_per_delivered_s": per(cpu["backend"]),
        "load_cpu_per_delivered_s": per(cpu["load"]),
        "publisher_cpu_per_delivered_s": per(cpu["bench"]),
        "cpu": cpu, "gate_rss_mb": harness.proc_rss_mb(run.gate.pid),
        "publisher_errors": publisher.errors, "client_errors": errors,
        "connections_lost": lost_reasons,
        "drained": stopped and in_transit <= 0, "in_transit_after_drain":
        in_transit, "delivery_ok": ok, "delivery_problems": problems,
        "persistent_total_whole_run": sum(publisher.per_player.values()),
        "broadcasts_whole_run": len(publisher.broadcast_counts),
    }
    print()
    print(f"=== pushes (mode {args.mode}, {args.transport}, {args.clients} "
          f"clients, {wall:.1f} s measured) ===")
    print(f"delivered          {delivered} pushes "
          f"({delivered / wall:,.0f} /s) read by the clients")
    if args.mode != "broadcast":
        print(f"  persistent       {persist} ({persist / wall:,.0f} /s) from "
              f"{calls['push']} POST /v1/push of {args.batch} players "
              f"({calls['push'] / wall:,.0f} /s, mean answer "
              f"{harness.ms(result['api_mean_latency_s']['push'])})")
    if args.mode != "push":
        print(f"  broadcast        {transient} ({transient / wall:,.0f} /s) "
              f"from {calls['broadcast']} POST /v1/broadcast "
              f"({calls['broadcast'] / wall:,.1f} /s, mean answer "
              f"{harness.ms(result['api_mean_latency_s']['broadcast'])})")
    print(f"gate CPU           {us(result['gate_cpu_per_delivered_s'])} per "
          f"delivered push   <- compare with PERF-NOTES.md")
    print(f"load CPU           {us(result['load_cpu_per_delivered_s'])} per "
          f"delivered push (clients)")
    print(f"publisher CPU      "
          f"{us(result['publisher_cpu_per_delivered_s'])} per delivered push")
    print("CPU during the window:")
    for line in harness.cpu_lines(cpu):
        print(line)
    if result["gate_rss_mb"] is not None:
        print(f"gate RSS at end    {result['gate_rss_mb']:.0f} MB")
    print(f"whole run          {result['persistent_total_whole_run']} "
          f"persistent pushes and {result['broadcasts_whole_run']} broadcasts "
          f"published; after the drain {max(in_transit, 0)} not read")
    for line in check_lines:
        print(line)
    print(f"client errors      {errors or 'none'}")
    if lost_reasons:
        print(f"connections lost   {lost_reasons}")
    print(f"publisher errors   {publisher.errors or 'none'}")
    dead = run.stack_problems()
    for line in dead:
        print(line)
    result["stack_problems"] = dead
    harness.write_json(args.json, result)
    if not ok or errors or publisher.errors or in_transit > 0 or dead:
        print("\nPROBLEMS: see above; logs in " + run.dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(harness.run_main(main, parse_args(sys.argv[1:]), "pushes"))
