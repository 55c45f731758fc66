"""
Request round trips through a gate: client -> gate -> reference backend ->
gate -> client.

    python -m bench.roundtrip [--clients 200] [--seconds 10]
                              [--transport tcp|ws] [--pipeline 1]
                              [--procs 1] [--json FILE]

Starts the reference backend (C{python -m backend}) and a gate (C{twistd -n
mmogate --config ...}) with C{backend.url} pointing at it, on free ports of
127.0.0.1; the load processes log each client in as C{{"name": "benchN"}}
and send C{req} route C{echo} back to back (the next request when a reply
comes, or C{--pipeline} requests in flight) until told to stop. After the
warm-up it measures C{--seconds}: round trips per second, latency
percentiles, and CPU seconds per round trip of the gate (from
C{/proc/<pid>/stat}, comparable with PERF-NOTES.md), the backend and the
load processes. See C{bench/README.md}.
"""

import argparse
import sys

from twisted.internet import defer
from twisted.internet.task import deferLater

from bench import harness
from bench.harness import BenchError, ms, us


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench.roundtrip",
        description="Request round trips per second and gate CPU per round "
        "trip, through a gate and the reference backend on 127.0.0.1.")
    harness.add_common_args(parser, clients=200)
    parser.add_argument("--pipeline", type=int, default=1,
                        help="requests each client keeps in flight; 1 sends "
                        "the next when the reply comes (default: "
                        "%(default)s; the gate's session.max_inflight is 64)")
    parser.add_argument("--payload", type=int, default=16,
                        help="length of the string echoed (default: "
                        "%(default)s)")
    args = parser.parse_args(argv)
    harness.check_common_args(parser, args)
    if not 1 <= args.pipeline <= 64:
        parser.error("--pipeline must be in [1, 64]")
    if not 0 <= args.payload <= 60000:
        parser.error("--payload must be in [0, 60000]")
    return args


def sleep(reactor, seconds):
    return deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def main(reactor, run):
    args = run.args
    print(f"roundtrip: {args.clients} clients over {args.transport}, "
          f"pipeline {args.pipeline}, {args.procs} load process(es), "
          f"warm-up {args.warmup:g}s, measuring {args.seconds:g}s; "
          f"revision {harness.revision()}", flush=True)
    yield run.start_stack()
    print(f"backend pid {run.backend.pid} on :{run.backend_port}, gate pid "
          f"{run.gate.pid} (tcp :{run.tcp_port}, ws :{run.ws_port}, "
          f"api :{run.api_port})", flush=True)
    deadline = 120 + args.clients / 20 + args.warmup + args.seconds + 60
    ready = yield run.start_workers(
        "roundtrip", args.transport, args.clients, args.procs, deadline,
        extra=["--pipeline", str(args.pipeline),
               "--payload", str(args.payload)])
    logged_in = sum(r["logged_in"] for r in ready)
    failed = sum(r["failed"] for r in ready)
    print(f"logged in: {logged_in} of {args.clients} (failed {failed}); "
          f"login p50 {max(r['login_p50_ms'] for r in ready):.1f} ms, "
          f"max {max(r['login_max_ms'] for r in ready):.1f} ms", flush=True)
    if not logged_in:
        raise BenchError("no client logged in: " + str(
            [r["errors"] for r in ready]))

    run.command("go")
    yield sleep(reactor, args.warmup)
    before = run.cpu_sample()
    yield run.command("mark", "marked")
    yield sleep(reactor, args.seconds)
    after = run.cpu_sample()
    snaps = yield run.command("snap", "snap")
    stopped = yield run.command("stop", "stopped", timeout=30)

    cpu = run.cpu_delta(before, after)
    wall = cpu["wall"]
    done = sum(s["done"] for s in snaps)
    hist = harness.merge_hist(s["hist"] for s in snaps)
    errors = {}
    for s in snaps:
        for k, v in s["errors"].items():
            errors[k] = errors.get(k, 0) + v
    errors_total = {}
    for s in stopped:
        for k, v in s["errors_total"].items():
            errors_total[k] = errors_total.get(k, 0) + v
    still = sum(s["still_inflight"] for s in stopped)
    online = sum(s["online"] for s in snaps)
    rate = done / wall if wall else 0.0

    def per(x):
        return None if x is None or not done else x / done

    result = {
        "benchmark": "roundtrip",
        "revision": harness.revision(),
        "clients": args.clients, "logged_in": logged_in,
        "online_at_end": online, "transport": args.transport,
        "pipeline": args.pipeline, "payload": args.payload,
        "procs": args.procs, "seconds": wall, "warmup": args.warmup,
        "round_trips": done, "round_trips_per_second": rate,
        "latency_p50_s": harness.hist_percentile(hist, 0.50),
        "latency_p99_s": harness.hist_percentile(hist, 0.99),
        "latency_p999_s": harness.hist_percentile(hist, 0.999),
        "latency_mean_s": harness.hist_mean(hist),
        "gate_cpu_per_round_trip_s": per(cpu["gate"]),
        "backend_cpu_per_round_trip_s": per(cpu["backend"]),
        "load_cpu_per_round_trip_s": per(cpu["load"]),
        "cpu": cpu,
        "gate_rss_mb": harness.proc_rss_mb(run.gate.pid),
        "errors_in_window": errors, "errors_total": errors_total,
        "inflight_unanswered_at_stop": still,
    }
    print()
    print(f"=== roundtrip ({args.transport}, {args.clients} clients, "
          f"pipeline {args.pipeline}, {wall:.1f} s measured) ===")
    print(f"round trips        {done}  ({rate:,.0f} /s)")
    print(f"latency            p50 {ms(result['latency_p50_s'])}, "
          f"p99 {ms(result['latency_p99_s'])}, "
          f"p99.9 {ms(result['latency_p999_s'])}")
    print(f"gate CPU           {us(result['gate_cpu_per_round_trip_s'])} "
          f"per round trip   <- compare with PERF-NOTES.md")
    print(f"backend CPU        {us(result['backend_cpu_per_round_trip_s'])} "
          f"per round trip")
    print(f"load CPU           {us(result['load_cpu_per_round_trip_s'])} "
          f"per round trip")
    print("CPU during the window:")
    for line in harness.cpu_lines(cpu):
        print(line)
    if result["gate_rss_mb"] is not None:
        print(f"gate RSS at end    {result['gate_rss_mb']:.0f} MB")
    print(f"clients online     {online} of {logged_in} at the end of the "
          f"window")
    print(f"errors (window)    {errors or 'none'}")
    if errors_total != errors:
        print(f"errors (whole run) {errors_total}")
    if still:
        print(f"unanswered         {still} client(s) still waiting 10 s "
              f"after the stop")
    dead = run.stack_problems()
    for line in dead:
        print(line)
    result["stack_problems"] = dead
    harness.write_json(args.json, result)
    problems = bool(errors) or bool(dead) or still or online != logged_in \
        or failed or not done
    if problems:
        print("\nPROBLEMS: see errors above; logs in " + run.dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(harness.run_main(main, parse_args(sys.argv[1:]), "roundtrip"))
