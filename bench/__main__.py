"""
Run the standard benchmark set and print a Markdown table of the results:

    python -m bench [--seconds 10] [--quick]

Runs, one after the other (each in its own subprocess, each with its own
backend and gate):

    roundtrip  tcp  200 clients
    roundtrip  ws   200 clients
    pushes     tcp  1000 clients  --mode both
    pushes     tcp  1000 clients  --mode push
    pushes     tcp  1000 clients  --mode broadcast
    pushes     ws   1000 clients  --mode broadcast

C{--quick} uses a fifth of the clients and 3 s windows, to check the
harness rather than to measure. Every run is bounded by a timeout.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.harness import REPO


def plan(quick):
    rt, push = (40, 200) if quick else (200, 1000)
    return [
        ("roundtrip", ["--transport", "tcp", "--clients", str(rt)]),
        ("roundtrip", ["--transport", "ws", "--clients", str(rt)]),
        ("pushes", ["--transport", "tcp", "--clients", str(push),
                    "--mode", "both"]),
        ("pushes", ["--transport", "tcp", "--clients", str(push),
                    "--mode", "push"]),
        ("pushes", ["--transport", "tcp", "--clients", str(push),
                    "--mode", "broadcast"]),
        ("pushes", ["--transport", "ws", "--clients", str(push),
                    "--mode", "broadcast"]),
    ]


def fmt_us(x):
    return "n/a" if x is None else f"{x * 1e6:.0f}"


def fmt_ms(x):
    return "n/a" if x is None else f"{x * 1e3:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured window of each run (default: 10, "
                        "3 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each benchmark this many times (all runs "
                        "are listed; on a shared machine, trust the rows "
                        "with the least 'other processes')")
    parser.add_argument("--wait-quiet", type=float, default=0,
                        help="passed to each run: wait up to this many "
                        "seconds for a quiet machine before starting")
    args = parser.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    rows = []
    failed = 0
    with tempfile.TemporaryDirectory(prefix="mmogate-bench-set-") as tmp:
        runs = [run for run in plan(args.quick)
                for _ in range(max(1, min(args.repeat, 10)))]
        for i, (name, extra) in enumerate(runs):
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, "-m", f"bench.{name}", "--seconds",
                   str(seconds), "--procs", str(args.procs), "--wait-quiet",
                   str(args.wait_quiet), "--json", out] + extra
            print(f"$ python -m bench.{name} {' '.join(extra)} --seconds "
                  f"{seconds:g} --procs {args.procs}", flush=True)
            try:
                limit = 600 + args.wait_quiet + 2 * seconds
                code = subprocess.run(cmd, cwd=REPO,
                                      timeout=limit).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            if code != 0:
                failed += 1
                print(f"-> {name} ended with {code}", flush=True)
            if os.path.exists(out):
                with open(out) as f:
                    rows.append(json.load(f))
    print()
    print("| benchmark | transport | clients | rate /s | gate CPU us/msg "
          "| p50 ms | p99 ms | gate % core | other processes % core |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = r["cpu"]
        gate_pct = 100 * cpu["gate"] / cpu["wall"] if cpu["gate"] else 0
        other = 100 * cpu["other"] / cpu["wall"]
        if r["benchmark"] == "roundtrip":
            label = f"roundtrip echo (pipeline {r['pipeline']})"
            rate = r["round_trips_per_second"]
            per = r["gate_cpu_per_round_trip_s"]
            p50, p99 = fmt_ms(r["latency_p50_s"]), fmt_ms(r["latency_p99_s"])
        else:
            label = f"pushes {r['mode']}"
            rate = r["delivered_per_second"]
            per = r["gate_cpu_per_delivered_s"]
            p50 = p99 = "-"
        print(f"| {label} | {r['transport']} | {r['clients']} | {rate:,.0f} "
              f"| {fmt_us(per)} | {p50} | {p99} | {gate_pct:.0f} "
              f"| {max(other, 0):.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
