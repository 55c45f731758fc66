"""
The SIGKILL proof (issue 4), measured: two gates on Redis, each in its own
process; C{--clients} real L{gate.client.GateClient}s logged in to gate K
(every fifth on WebSocket), each given both gates' addresses; persistent
pushes flowing to all of them through gate B's push API the whole time;
then K is killed with SIGKILL.

    python -m bench.killgate [--clients 200] [--procs 2]

How clients find another gate: a L{GateClient} given several addresses
retries the gate it lost once, and moves on to the next address when that
attempt fails (a dead gate refuses at once); it resumes there with its
token and its last seq.

Reported: the time to recover (from the SIGKILL until the last client has
resumed on B), the spread of the resumes (min / p50 / p90 / max seconds
after the kill), the pushes answered C{queued} while the players were
between gates, and the check: every client ends on B and was handed
exactly the pushes the store numbered for it, once each and in order,
which is what the push API acknowledged. Exit status 0 when all of that
holds, 1 when it does not, 2 when the run could not be made.
"""

import argparse
import sys
import time

from twisted.internet import defer

from bench import cluster, harness
from bench.cluster import BenchError, fmt_spread, sleep, spread


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench.killgate",
        description="SIGKILL one of two gates on Redis under persistent "
        "pushes; check that its players resume on the other with their "
        "mailboxes.")
    cluster.add_args(parser, clients=200)
    parser.add_argument("--before", type=float, default=2.0,
                        help="seconds of pushes before the kill (default: "
                        "%(default)s)")
    parser.add_argument("--after", type=float, default=2.0,
                        help="seconds of pushes after every player resumed "
                        "(default: %(default)s)")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="longest wait for the players to resume "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    cluster.check_args(parser, args)
    return args


@defer.inlineCallbacks
def main(reactor, run):
    args = run.args
    print(f"SIGKILL proof: {args.clients} clients (every "
          f"{args.ws_every or 'no'}th on WebSocket) on gate K, gate B "
          f"beside it on Redis, {args.procs} load processes, pushes to "
          f"{args.batch} players every {args.interval:g}s through B's API; "
          f"revision {harness.revision()}", flush=True)
    yield run.start_cluster(["K", "B"])
    k, b = run.gates["K"], run.gates["B"]
    print(f"gates: K pid {k.child.pid} (tcp :{k.tcp}), B pid {b.child.pid} "
          f"(tcp :{b.tcp}, api :{b.api}); Redis prefix {run.prefix}",
          flush=True)
    deadline = 300 + args.clients / 10 + args.max_wait
    ready = yield run.start_clients("kill", ["K", "B"], args.clients,
                                    args.procs, deadline)
    logged_in = sum(r["logged_in"] for r in ready)
    if logged_in != args.clients:
        raise BenchError(f"only {logged_in} of {args.clients} clients "
                         f"logged in: {[r['failed'] for r in ready]}")
    print(f"logged in: {logged_in} in "
          f"{max(r['seconds'] for r in ready):.1f}s", flush=True)
    names = [f"proof{i}" for i in range(args.clients)]

    publisher = cluster.Publisher(reactor, run, [b], names, args.batch,
                                  args.interval)
    publisher.start()
    run.start_sampling()
    yield sleep(reactor, args.before)

    cpu_before = run.cpu_mark()
    killed_at = time.time()
    k.child.signal("KILL")
    print("gate K killed; waiting for its players to resume on B",
          flush=True)
    yield run.wait_for(lambda: run.total("resumed") >= args.clients,
                       "every player to resume on B", args.max_wait)
    recovered_at = time.time()
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
                                           set(names))
    lost = spread([c["disconnected"] - killed_at for c in finals.values()
                   if c["disconnected"]])
    resumed = spread([c["resumed"] - killed_at for c in finals.values()
                      if c["resumed"]])
    last_resume = max((c["resumed"] for c in finals.values()
                       if c["resumed"]), default=None)
    queued_between = sum(queued for _, sent, outcome, _, queued
                         in publisher.calls
                         if outcome == "ok"
                         and killed_at <= sent <= recovered_at)
    wall = recovered_at - killed_at
    cpu = run.cpu_between(cpu_before, cpu_after)
    result = {
        "benchmark": "killgate", "revision": harness.revision(),
        "clients": args.clients,
        "recover_seconds": (last_resume - killed_at) if last_resume
        else None,
        "connection_lost_s": lost, "resumed_on_b_s": resumed,
        "push_calls": publisher.ok_calls(),
        "pushes_delivered": publisher.answers["delivered"],
        "pushes_queued": publisher.answers["queued"],
        "pushes_queued_between_gates": queued_between,
        "push_outcomes": {f"{g}:{o}": n
                          for (g, o), n in publisher.outcomes.items()},
        "cpu_while_recovering_s": cpu, "k_exit": k.child.exit,
        "check_ok": ok, "problems": dict(problems), "examples": examples,
    }
    print()
    print(f"=== SIGKILL of gate K ({args.clients} players) under persistent "
          f"pushes ===")
    print(f"time to recover    {result['recover_seconds']:.2f} s from the "
          f"SIGKILL until the last player resumed on B")
    print("players (s after the kill, min / p50 / p90 / max):")
    print(f"  connection lost  {fmt_spread(lost)}")
    print(f"  resumed on B     {fmt_spread(resumed)}")
    print(f"pushes             {publisher.ok_calls()} POST /v1/push of "
          f"{args.batch} players acknowledged through B "
          f"({publisher.answers['delivered']} delivered, "
          f"{publisher.answers['queued']} queued, {queued_between} of those "
          f"queued while the players were between gates); outcomes "
          f"{result['push_outcomes']}")
    print(f"CPU while recovering ({wall:.1f} s; % of one core): "
          + cluster.cpu_line(cpu, wall))
    if last_resume is not None:
        slowest = max((c for c in finals.values() if c["resumed"]),
                      key=lambda c: c["resumed"])
        print("slowest player     " + ", ".join(
            f"{state} {t - killed_at:+.2f}" for state, t in slowest["timeline"]
            if t >= killed_at - 0.001))
    if ok:
        print(f"check              OK: all {args.clients} players on B; each "
              f"was handed exactly seq 1..last_seq of the store, once, in "
              f"order, matching the API's answers")
    else:
        print("check              FAILED: " + ", ".join(
            f"{k} {v}" for k, v in problems.items()))
        for line in examples:
            print(f"  {line}")
    harness.write_json(args.json, result)
    if not ok or not queued_between:
        if not queued_between:
            print("no push was answered queued while the players were "
                  "between gates: the window was not covered")
        print("\nPROBLEMS: see above; logs in " + run.dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(harness.run_main(main, parse_args(sys.argv[1:]), "killgate",
                              cluster.ClusterRun))
