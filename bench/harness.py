"""
What both benchmarks share: starting the reference backend and a gate as
subprocesses on free loopback ports, the load processes and their control
pipes, CPU accounting from C{/proc}, latency histograms, and tearing it all
down whatever happens.

Every child is started through L{bench._launch}, which makes the kernel kill
it if this process dies, so nothing outlives a benchmark even when it is
killed itself; the normal path stops the load processes, then the gate
(SIGTERM, SIGKILL after a bound), then the backend.
"""

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater

from bench import httpc
from bench.loadgen import RES

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """
    The benchmark cannot go on; the message says why.
    """


def free_ports(n):
    """
    C{n} distinct free TCP ports on 127.0.0.1 (held open together while
    chosen, so they differ; another process could still take one before the
    gate binds it, which then fails start-up with a clear message).
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# CPU accounting.

def proc_cpu(pid):
    """
    User plus system CPU seconds of process C{pid} (all its threads), or
    C{None} once it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    # Fields 14 and 15 of proc(5), counted after "pid (comm)".
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine_cpu():
    """
    C{(busy, total)} CPU seconds of the whole machine, all cores.
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    irq = sum(values[5:7])
    return (total - idle) / CLK_TCK, total / CLK_TCK, irq / CLK_TCK


# Latency histograms (see bench.loadgen.bucket).

def merge_hist(hists):
    merged = {}
    for hist in hists:
        for k, v in hist.items():
            k = int(k)
            merged[k] = merged.get(k, 0) + v
    return merged


def hist_percentile(hist, q):
    """
    The latency in seconds below which a fraction C{q} of samples lie (the
    geometric middle of its bucket), or C{None} without samples.
    """
    total = sum(hist.values())
    if not total:
        return None
    want = q * total
    seen = 0
    for k in sorted(hist):
        seen += hist[k]
        if seen >= want:
            return math.exp((k + 0.5) / RES) / 1e6
    return math.exp((max(hist) + 0.5) / RES) / 1e6


def hist_mean(hist):
    total = sum(hist.values())
    if not total:
        return None
    return sum(math.exp((k + 0.5) / RES) * v for k, v in hist.items()) \
        / total / 1e6


# Child processes.

class Child(ProcessProtocol):
    """
    One subprocess: output to a log file, or (for load processes) JSON lines
    to L{on_event}; C{ended} fires with its exit description.
    """

    def __init__(self, name, log_path, on_event=None):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.on_event = on_event
        self._partial = b""
        self.ended = defer.Deferred()
        self.exit = None
        self.pid = None

    def connectionMade(self):
        self.pid = self.transport.pid

    def outReceived(self, data):
        if self.on_event is None:
            self._log.write(data)
            return
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > 64 << 20:
            self._partial = b""
        for line in lines:
            if line.strip():
                try:
                    event = json.loads(line)
                except ValueError:
                    self._log.write(b"unparsed: " + line + b"\n")
                    continue
                self.on_event(self, event)

    def errReceived(self, data):
        self._log.write(data)

    def processEnded(self, reason):
        value = reason.value
        if getattr(value, "signal", None):
            self.exit = f"killed by signal {value.signal}"
        else:
            self.exit = f"exit code {getattr(value, 'exitCode', '?')}"
        self._log.close()
        self.ended.callback(self.exit)

    @property
    def running(self):
        return not self.ended.called

    def send(self, obj):
        if self.running:
            self.transport.write(json.dumps(obj).encode("utf-8") + b"\n")

    def signal(self, name):
        if self.running:
            try:
                self.transport.signalProcess(name)
            except Exception:
                pass

    def log_tail(self, lines=15):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-8000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _within(reactor, d, seconds):
    """
    Wait for C{d} at most C{seconds}; C{True} if it fired in time.
    """
    if d.called:
        return defer.succeed(True)
    done = defer.Deferred()
    timer = reactor.callLater(seconds, lambda: done.called or
                              done.callback(False))

    def fired(result):
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(True)
        return result

    d.addBoth(fired)
    return done


class Run:
    """
    One benchmark run: a run directory (logs, gate config), the backend, the
    gate, the load processes, and the publisher's connections.
    """

    def __init__(self, reactor, args, title):
        self.reactor = reactor
        self.args = args
        self.title = title
        self.dir = tempfile.mkdtemp(prefix=f"mmogate-bench-{title}-")
        self.children = []
        self.backend = None
        self.gate = None
        self.workers = []
        self._waiters = {}
        self.api_key = secrets.token_hex(16)
        self.on_progress = None
        self._spawned_pids = []
        self._shutdown = None
        #: Set once the run has been wound down (normally or not).
        self.finished = False

    # Spawning.

    def spawn(self, name, argv, on_event=None, env=None):
        child = Child(name, os.path.join(self.dir, f"{name}.log"), on_event)
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["MMOGATE_BENCH_PARENT"] = str(os.getpid())
        full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get(
            "PYTHONPATH", "")
        launch = [sys.executable, "-m", "bench._launch"] + argv
        self.reactor.spawnProcess(child, sys.executable, launch, env=full_env,
                                  path=REPO)
        self.children.append(child)
        self._spawned_pids.append(child.pid)
        return child

    @defer.inlineCallbacks
    def start_stack(self):
        """
        Start the reference backend and a gate pointed at it; fire once both
        answer.
        """
        wait_until = time.monotonic() + getattr(self.args, "wait_quiet", 0)
        while True:
            before = machine_cpu()
            yield deferLater(self.reactor, 2.0, lambda: None)
            after = machine_cpu()
            busy = (after[0] - before[0]) / max(after[1] - before[1], 1e-9)
            if busy <= 0.1 or time.monotonic() >= wait_until:
                break
        self.busy_before = busy
        print(f"machine busy before starting: {100 * busy:.0f}% of "
              f"{os.cpu_count()} cores"
              + ("  <- other processes are running; figures will be "
                 "disturbed" if busy > 0.1 else ""), flush=True)
        (self.backend_port, self.tcp_port, self.ws_port, self.api_port,
         self.metrics_port) = free_ports(5)
        api_url = f"http://{HOST}:{self.api_port}"
        self.backend = self.spawn(
            "backend",
            [sys.executable, "-m", "backend",
             "--listen", f"tcp:{self.backend_port}:interface={HOST}",
             "--api-url", api_url],
            env={"MMOGATE_API_KEY": self.api_key})
        yield self._wait_port(self.backend, self.backend_port, 20)
        config = os.path.join(self.dir, "gate.toml")
        with open(config, "w") as f:
            f.write(self.gate_config())
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if os.path.exists(twistd):
            cmd = [twistd]
        else:
            cmd = [sys.executable, "-c",
                   "import sys; from twisted.scripts.twistd import run; "
                   "sys.argv[0] = 'twistd'; run()"]
        profile = []
        if getattr(self.args, "gate_profile", None):
            # twistd's own profiling: cProfile stats written when the gate
            # stops (read them with pstats). Inflates the gate's CPU.
            profile = ["--profile", os.path.abspath(self.args.gate_profile),
                       "--profiler", "cprofile", "--savestats"]
        self.gate = self.spawn(
            "gate", cmd + ["-n", "--pidfile="] + profile
            + ["mmogate", "--config", config])
        yield self._wait_ready(self.gate, 30)

    def gate_config(self):
        backlog = 4096
        return "\n".join([
            "[gate]",
            'id = "bench"',
            "[listen]",
            f'tcp = "tcp:{self.tcp_port}:interface={HOST}:backlog={backlog}"',
            f'ws = "tcp:{self.ws_port}:interface={HOST}:backlog={backlog}"',
            f'api = "tcp:{self.api_port}:interface={HOST}"',
            f'metrics = "tcp:{self.metrics_port}:interface={HOST}"',
            "[backend]",
            f'url = "http://{HOST}:{self.backend_port}"',
            "[api]",
            f'key = "{self.api_key}"',
            "[auth]",
            f'secret = "{secrets.token_hex(32)}"',
            "[shutdown]",
            "grace = 3.0",
            # Every simulated client connects from 127.0.0.1 at once.
            "[limits]",
            "connect_rate = 1000000.0",
            "connect_burst = 1000000",
            "",
        ])

    @defer.inlineCallbacks
    def _wait_port(self, child, port, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if not child.running:
                raise BenchError(f"{child.name} exited ({child.exit}) before "
                                 f"listening:\n{child.log_tail()}")
            s = socket.socket()
            s.settimeout(1.0)
            try:
                s.connect((HOST, port))
                return
            except OSError:
                pass
            finally:
                s.close()
            if time.monotonic() > deadline:
                raise BenchError(f"{child.name} not listening on {port} "
                                 f"after {timeout}s:\n{child.log_tail()}")
            yield deferLater(self.reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def _wait_ready(self, child, timeout):
        deadline = time.monotonic() + timeout
        yield self._wait_port(child, self.metrics_port, timeout)
        while True:
            status = None
            try:
                conn = yield httpc.connect(self.reactor, HOST,
                                           self.metrics_port, timeout=5)
                status, _ = yield conn.request("GET", "/ready")
                conn.close()
            except httpc.HTTPError:
                pass
            if status == 200:
                # And the client listeners.
                yield self._wait_port(child, self.tcp_port, 5)
                yield self._wait_port(child, self.ws_port, 5)
                return
            if not child.running:
                raise BenchError(f"gate exited ({child.exit}):\n"
                                 f"{child.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"gate not ready after {timeout}s "
                                 f"(/ready {status}):\n{child.log_tail()}")
            yield deferLater(self.reactor, 0.2, lambda: None)

    # Load processes.

    def split(self, total, procs):
        """
        C{[(first, count)]}: C{total} clients over C{procs} processes.
        """
        procs = max(1, min(procs, total))
        base, extra = divmod(total, procs)
        parts, first = [], 0
        for i in range(procs):
            count = base + (1 if i < extra else 0)
            parts.append((first, count))
            first += count
        return parts

    @defer.inlineCallbacks
    def start_workers(self, role, transport, clients, procs, deadline,
                      extra=()):
        port = self.tcp_port if transport == "tcp" else self.ws_port
        for i, (first, count) in enumerate(self.split(clients, procs)):
            argv = [sys.executable, "-m", "bench.loadgen", "--role", role,
                    "--transport", transport, "--host", HOST,
                    "--port", str(port), "--first", str(first),
                    "--count", str(count), "--deadline", str(deadline)]
            argv += list(extra)
            worker = self.spawn(f"load{i}", argv, on_event=self._event)
            worker.progress = (0, 0)
            self.workers.append(worker)
        timeout = 60 + clients / 20
        ready = yield self.gather("ready", timeout)
        return ready

    def _event(self, child, event):
        kind = event.get("ev")
        if kind == "p":
            child.progress = (event["n"], event["b"])
            if self.on_progress is not None:
                self.on_progress()
            return
        if kind == "deadline":
            child.deadline_hit = True
        waiters = self._waiters.get(kind)
        if waiters is not None:
            waiters[child] = event
            d, expected = waiters["_d"], waiters["_n"]
            if len(waiters) - 2 == expected and not d.called:
                del self._waiters[kind]
                d.callback([waiters[w] for w in self.workers])

    def gather(self, kind, timeout):
        """
        Wait for event C{kind} from every load process (in worker order).
        """
        d = defer.Deferred()
        self._waiters[kind] = {"_d": d, "_n": len(self.workers)}

        def check():
            if d.called:
                return
            dead = [w for w in self.workers if not w.running]
            if dead or time.monotonic() > until:
                self._waiters.pop(kind, None)
                why = "; ".join(f"{w.name} {w.exit}:\n{w.log_tail()}"
                                for w in dead) or f"timeout {timeout}s"
                d.errback(BenchError(f"waiting for '{kind}' from the load "
                                     f"processes failed: {why}"))
                return
            self.reactor.callLater(0.1, check)

        until = time.monotonic() + timeout
        self.reactor.callLater(0.1, check)
        return d

    def command(self, cmd, reply=None, timeout=30):
        """
        Send C{cmd} to every load process; with C{reply}, wait for it.
        """
        d = self.gather(reply, timeout) if reply else None
        for w in self.workers:
            w.send({"cmd": cmd})
        return d

    def progress(self):
        persist = sum(w.progress[0] for w in self.workers)
        transient = sum(w.progress[1] for w in self.workers)
        return persist, transient

    def stack_problems(self):
        """
        Text about the backend or gate having exited during the run
        (empty when both still run), with the tail of their logs.
        """
        lines = []
        for child in (self.gate, self.backend):
            if child is not None and not child.running:
                lines.append(f"THE {child.name.upper()} PROCESS EXITED during "
                             f"the run ({child.exit}); last log lines:")
                lines.extend("    " + line
                             for line in child.log_tail(20).splitlines())
        return lines

    # CPU sampling.

    def cpu_sample(self):
        """
        CPU seconds of each process of the run, the machine's, and the time.
        """
        sample = {"t": time.monotonic(),
                  "gate": proc_cpu(self.gate.pid),
                  "backend": proc_cpu(self.backend.pid),
                  "load": [proc_cpu(w.pid) for w in self.workers],
                  "bench": proc_cpu(os.getpid()),
                  "machine": machine_cpu()}
        return sample

    def cpu_delta(self, before, after):
        def diff(a, b):
            return None if a is None or b is None else b - a
        load = [diff(a, b) for a, b in zip(before["load"], after["load"])]
        busy = after["machine"][0] - before["machine"][0]
        total = after["machine"][1] - before["machine"][1]
        ours = sum(x for x in [diff(before["gate"], after["gate"]),
                               diff(before["backend"], after["backend"]),
                               diff(before["bench"], after["bench"])] + load
                   if x is not None)
        return {"wall": after["t"] - before["t"],
                "other": max(0.0, busy - ours),
                "irq": after["machine"][2] - before["machine"][2],
                "gate": diff(before["gate"], after["gate"]),
                "backend": diff(before["backend"], after["backend"]),
                "load": sum(x for x in load if x is not None),
                "load_each": load,
                "bench": diff(before["bench"], after["bench"]),
                "machine_busy": busy,
                "machine_total": total,
                "cores": os.cpu_count()}

    # Tearing down.

    def shutdown(self):
        """
        Stop everything: load processes, then the gate, then the backend.
        Each step is bounded; SIGKILL is the last word. Idempotent.
        """
        if self._shutdown is None:
            self._shutdown = self._shutdown_steps()
        d = defer.Deferred()
        self._shutdown.addBoth(lambda _: d.callback(None))
        return d

    @defer.inlineCallbacks
    def _shutdown_steps(self):
        self.finished = True
        for w in self.workers:
            if w.running:
                w.send({"cmd": "exit"})
                try:
                    w.transport.closeStdin()
                except Exception:
                    pass
        for w in self.workers:
            yield self._stop_child(w, first=None, wait=10)
        if self.gate is not None:
            yield self._stop_child(self.gate, "TERM", 15)
        if self.backend is not None:
            yield self._stop_child(self.backend, "TERM", 10)

    @defer.inlineCallbacks
    def _stop_child(self, child, first, wait):
        if not child.running:
            return
        if first:
            child.signal(first)
        ok = yield _within(self.reactor, child.ended, wait)
        if not ok:
            child.signal("KILL")
            yield _within(self.reactor, child.ended, 5)

    def kill_leftovers(self):
        """
        Synchronous last resort (the reactor may be gone): SIGKILL any child
        still alive.
        """
        for pid in self._spawned_pids:
            if pid is None:
                continue
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
                fields = stat[stat.rindex(b")") + 2:].split()
                if fields[0] == b"Z" or int(fields[1]) != os.getpid():
                    continue
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass


# Reporting.

def revision():
    """
    The checkout's commit, marked when the tree has changes.
    """
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                               capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return rev + ("+changes" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def us(seconds):
    return "n/a" if seconds is None else f"{seconds * 1e6:.1f} us"


def ms(seconds):
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f} ms"


def cpu_lines(cpu):
    """
    Where the CPU went during the measured window, as text lines.
    """
    wall = cpu["wall"] or 1e-9

    def share(x):
        if x is None:
            return "n/a"
        return f"{x:.2f} s ({100 * x / wall:.0f}% of a core)"

    total = cpu["machine_total"] or 1e-9
    each = ", ".join(f"{x:.2f}" for x in cpu["load_each"] if x is not None)
    busy = 100 * cpu["machine_busy"] / total
    lines = [
        f"  gate process       {share(cpu['gate'])}",
        f"  reference backend  {share(cpu['backend'])}",
        f"  load processes     {share(cpu['load'])}"
        + (f"  [{each}]" if len(cpu["load_each"]) > 1 else ""),
        f"  bench/publisher    {share(cpu['bench'])}",
        f"  everything else    {share(cpu['other'])}  (other processes; "
        f"interrupts/softirq, mostly loopback networking, took "
        f"{cpu['irq']:.2f} s, mostly also counted above)",
        f"  whole machine      {cpu['machine_busy']:.2f} s busy of "
        f"{cpu['machine_total']:.2f} s ({busy:.0f}% "
        f"of {cpu['cores']} cores)",
    ]
    gate = cpu["gate"]
    if cpu["other"] > 0.2 * wall:
        lines.append(f"  -> WARNING: other processes took "
                     f"{100 * cpu['other'] / wall:.0f}% of a "
                     f"core during the window: the figures are disturbed; "
                     f"rerun on a quiet machine.")
    busiest_load = max((x for x in cpu["load_each"] if x is not None),
                       default=0.0)
    if busiest_load / wall > 0.9:
        lines.append("  -> a load process used a whole core: the load "
                     "generator limited the rate (try --procs 2); gate CPU "
                     "per message is still valid.")
    if gate is not None and gate / wall > 0.9:
        lines.append("  -> the gate used a whole core: it was the bottleneck.")
    elif cpu["machine_busy"] / total > 0.9:
        lines.append("  -> the machine was saturated: the gate shared its "
                     "cores with the backend and the load generator, so "
                     "throughput is a lower bound; CPU per message is the "
                     "figure to compare.")
    return lines


def write_json(path, result):
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
            f.write("\n")


def add_common_args(parser, clients):
    parser.add_argument("--clients", type=int, default=clients,
                        help="simulated clients (default: %(default)s)")
    parser.add_argument("--transport", choices=("tcp", "ws"), default="tcp",
                        help="client transport (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="measured window (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of load before measuring "
                        "(default: %(default)s)")
    parser.add_argument("--procs", type=int, default=1,
                        help="load processes the clients are spread over "
                        "(default: %(default)s)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON to FILE")
    parser.add_argument("--wait-quiet", type=float, default=0,
                        metavar="SECONDS",
                        help="before starting, wait up to SECONDS for the "
                        "machine to be under 10%% busy (default: do not "
                        "wait)")
    parser.add_argument("--gate-profile", metavar="FILE",
                        help="run the gate under cProfile (twistd --profile) "
                        "and save its stats to FILE at the end; for finding "
                        "where the gate's CPU goes, not for the figures")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run directory (logs, gate config) "
                        "even when the run succeeds")


def check_common_args(parser, args):
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]")
    if not 0 <= args.warmup <= 600:
        parser.error("--warmup must be in [0, 600]")
    if not 1 <= args.procs <= 64:
        parser.error("--procs must be in [1, 64]")
    if not 0 <= args.wait_quiet <= 3600:
        parser.error("--wait-quiet must be in [0, 3600]")


def run_main(main, args, title, run_class=None):
    """
    Run C{main(reactor, run)} under the reactor; every child is gone when
    this returns, whatever happened (an error, Ctrl-C, SIGTERM). Returns
    C{main}'s status.

    @param run_class: the L{Run} (sub)class of C{run}.
    """
    from twisted.internet import reactor

    status = {"code": 1}
    run = (run_class or Run)(reactor, args, title)

    @defer.inlineCallbacks
    def top():
        print(f"run directory: {run.dir}", flush=True)
        try:
            status["code"] = yield main(reactor, run)
        except BenchError as e:
            print(f"\nBENCHMARK FAILED: {e}", file=sys.stderr, flush=True)
            status["code"] = 2
        except Exception:
            import traceback
            traceback.print_exc()
            status["code"] = 2
        finally:
            try:
                yield run.shutdown()
            finally:
                try:
                    reactor.stop()
                except Exception:
                    pass  # already stopping (Ctrl-C)

    def interrupted():
        # Ctrl-C or SIGTERM stop the reactor; its "before shutdown" phase
        # waits for this Deferred, so the children go first.
        if not run.finished:
            status["interrupted"] = True
            print("\ninterrupted: stopping the children", file=sys.stderr,
                  flush=True)
        return run.shutdown()

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    reactor.callWhenRunning(top)
    try:
        reactor.run()
    finally:
        run.kill_leftovers()
    if status.get("interrupted"):
        status["code"] = 130
    if status["code"] == 0 and not getattr(args, "keep", False):
        shutil.rmtree(run.dir, ignore_errors=True)
    else:
        print(f"logs and gate config kept in {run.dir}", flush=True)
    return status["code"]
