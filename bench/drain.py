"""
The drain proof (issue 4), measured: two gates on Redis, each in its own
process; C{--clients} real L{gate.client.GateClient}s, half on each gate
(every fifth on WebSocket), with persistent pushes flowing to all of them
through both gates' push APIs the whole time; then gate A is drained
towards gate B (C{POST /v1/drain}).

    python -m bench.drain [--clients 1000] [--jitter 5] [--procs 2]

Reported: the time to drain (from the drain call until A's process has
exited), the spread of the reconnects (when each client of A received
C{reconnect}, when it was resumed on B, and how long each move took:
min / p50 / p90 / max), the pushes sent, the gates' CPU during the drain,
and the check: every client ends on B and was handed exactly the pushes
the store numbered for it (C{GET /v1/players/{id}} C{last_seq}), once
each and in order, which is what the push API acknowledged. Exit status
0 when all of that holds, 1 when it does not, 2 when the run could not be
made.
"""

import argparse
import json
import sys
import time

from twisted.internet import defer

from bench import cluster, harness, httpc
from bench.cluster import HOST, BenchError, fmt_spread, sleep, spread


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench.drain",
        description="Drain one of two gates on Redis under persistent "
        "pushes; check that no push is lost or duplicated.")
    cluster.add_args(parser, clients=1000)
    parser.add_argument("--before", type=float, default=2.0,
                        help="seconds of pushes before the drain "
                        "(default: %(default)s)")
    parser.add_argument("--after", type=float, default=2.0,
                        help="seconds of pushes (through B) after A has "
                        "stopped (default: %(default)s)")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="the drain's deadline (default: %(default)s)")
    args = parser.parse_args(argv)
    cluster.check_args(parser, args)
    return args


@defer.inlineCallbacks
def main(reactor, run):
    args = run.args
    print(f"drain proof: {args.clients} clients (every "
          f"{args.ws_every or 'no'}th on WebSocket) over gates A and B on "
          f"Redis, {args.procs} load processes, pushes to {args.batch} "
          f"players every {args.interval:g}s through each gate's API; "
          f"drain.jitter {args.jitter:g}s; revision {harness.revision()}",
          flush=True)
    yield run.start_cluster(["A", "B"])
    a, b = run.gates["A"], run.gates["B"]
    print(f"gates: A pid {a.child.pid} (tcp :{a.tcp}, api :{a.api}), "
          f"B pid {b.child.pid} (tcp :{b.tcp}, api :{b.api}); Redis prefix "
          f"{run.prefix}", flush=True)
    deadline = 300 + args.clients / 10 + args.deadline
    ready = yield run.start_clients("drain", ["A", "B"], args.clients,
                                    args.procs, deadline)
    logged_in = sum(r["logged_in"] for r in ready)
    if logged_in != args.clients:
        raise BenchError(f"only {logged_in} of {args.clients} clients "
                         f"logged in: {[r['failed'] for r in ready]}")
    print(f"logged in: {logged_in} in "
          f"{max(r['seconds'] for r in ready):.1f}s", flush=True)
    names = [f"proof{i}" for i in range(args.clients)]
    on_a = {f"proof{i}" for i in range(0, args.clients, 2)}

    publisher = cluster.Publisher(reactor, run, [a, b], names, args.batch,
                                  args.interval)
    publisher.start()
    run.start_sampling()
    yield sleep(reactor, args.before)

    cpu_before = run.cpu_mark()
    target = {"addr": f"{HOST}:{b.tcp}",
              "addrs": {"ws": f"ws://{HOST}:{b.ws}/ws"},
              "deadline": args.deadline}
    conn = yield httpc.connect(reactor, HOST, a.api, timeout=10)
    drain_at = time.time()
    status, body = yield conn.request(
        "POST", "/v1/drain", json.dumps(target).encode("utf-8"),
        (publisher.auth, b"Content-Type: application/json"))
    conn.close()
    if status != 200:
        raise BenchError(f"POST /v1/drain answered {status}: {body!r}")
    print(f"drain of A called; waiting for its {len(on_a)} clients to move",
          flush=True)
    yield run.wait_for(lambda: run.total("resumed") >= len(on_a),
                       "every client of A to resume on B",
                       args.deadline + 30)
    all_resumed_at = time.time()
    yield run.wait_for(lambda: a.stopped_at is not None,
                       "A's process to exit", args.deadline + 30)
    cpu_after = run.cpu_mark()
    yield sleep(reactor, args.after)
    yield publisher.stop()

    records = yield run.records(b, names)
    expected = sum(r.get("last_seq", 0) for r in records.values())
    try:
        yield run.wait_for(lambda: run.total("handed") >= expected,
                           "the clients to be handed every push", 30)
    except BenchError as e:
        print(f"  {e}", flush=True)
    finals = yield run.finals()
    ok, problems, examples = cluster.check(finals, records, publisher, "B",
                                           on_a)

    moved = [finals[n] for n in sorted(on_a)]
    told = spread([c["migrating"] - drain_at for c in moved
                   if c["migrating"]])
    resumed = spread([c["resumed"] - drain_at for c in moved
                      if c["resumed"]])
    took = spread([c["resumed"] - c["migrating"] for c in moved
                   if c["resumed"] and c["migrating"]])
    drain_time = a.stopped_at - drain_at
    during = publisher.ok_calls(since=drain_at, until=a.stopped_at)
    through_a = publisher.ok_calls("A", since=drain_at)
    cpu = run.cpu_between(cpu_before, cpu_after)
    a_exit = a.child.exit
    result = {
        "benchmark": "drain", "revision": harness.revision(),
        "clients": args.clients, "moved": len(on_a),
        "jitter": args.jitter, "drain_seconds": drain_time,
        "all_resumed_seconds": all_resumed_at - drain_at,
        "reconnect_received_s": told, "resumed_on_b_s": resumed,
        "move_s": took, "push_calls": publisher.ok_calls(),
        "push_calls_during_drain": during, "push_calls_through_a_during_drain":
        through_a, "pushes_delivered": publisher.answers["delivered"],
        "pushes_queued": publisher.answers["queued"],
        "push_outcomes": {f"{g}:{o}": n
                          for (g, o), n in publisher.outcomes.items()},
        "push_answer_mean_s": (sum(publisher.latency)
                               / max(len(publisher.latency), 1)),
        "cpu_during_drain_s": cpu, "a_exit": a_exit,
        "check_ok": ok, "problems": dict(problems), "examples": examples,
    }
    print()
    print(f"=== drain of gate A ({len(on_a)} of {args.clients} clients) "
          f"under persistent pushes ===")
    print(f"time to drain      {drain_time:.2f} s from POST /v1/drain to A's "
          f"process exiting ({a_exit}); every client of A resumed on B "
          f"after {all_resumed_at - drain_at:.2f} s")
    print("reconnects (s after the drain call, min / p50 / p90 / max):")
    print(f"  told (reconnect) {fmt_spread(told)}")
    print(f"  resumed on B     {fmt_spread(resumed)}")
    print(f"  each move took   {fmt_spread(took)}")
    answers = publisher.answers
    print(f"pushes             {publisher.ok_calls()} POST /v1/push of "
          f"{args.batch} players acknowledged ({answers['delivered']} "
          f"delivered, {answers['queued']} queued), {during} of "
          f"them during the drain ({through_a} through A); mean answer "
          f"{1e3 * result['push_answer_mean_s']:.1f} ms; outcomes "
          f"{result['push_outcomes']}")
    print(f"CPU during the drain ({drain_time:.1f} s; % of one core): "
          + cluster.cpu_line(cpu, drain_time))
    uncertain = sum(1 for n in names if publisher.uncertain[n])
    if ok:
        print(f"check              OK: all {args.clients} clients on B; each "
              f"was handed exactly seq 1..last_seq of the store, once, in "
              f"order, matching the API's answers"
              + (f" ({uncertain} players with an uncertain call, within "
                 f"its range)" if uncertain else ""))
    else:
        print("check              FAILED: " + ", ".join(
            f"{k} {v}" for k, v in problems.items()))
        for line in examples:
            print(f"  {line}")
    harness.write_json(args.json, result)
    if not ok or a_exit != "exit code 0":
        print("\nPROBLEMS: see above; logs in " + run.dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(harness.run_main(main, parse_args(sys.argv[1:]), "drain",
                              cluster.ClusterRun))
