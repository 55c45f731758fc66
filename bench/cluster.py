"""
What the cluster proofs share (C{python -m bench.drain},
C{python -m bench.killgate}): a reference backend and several gates on
Redis (each C{twistd -n mmogate} in its own process, one key prefix of the
run's own, deleted at the end), load processes of real
L{gate.client.GateClient}s (L{bench.proofload}), a publisher that keeps
persistent pushes flowing through the gates' push APIs and counts per
player what the API acknowledged, and the check that every client was
handed exactly the pushes the store numbered for it.

Every child is started through L{bench._launch} (it dies with this
process); the end stops the load processes, then the gates (SIGTERM), then
the backend, as L{bench.harness} does.
"""

import json
import os
import secrets
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.task import LoopingCall, deferLater

from bench import harness, httpc
from bench.harness import HOST, BenchError

#: Bound on one push API call or player lookup.
CALL_TIMEOUT = 30.0


def sleep(reactor, seconds):
    return deferLater(reactor, seconds, lambda: None)


def spread(values):
    """
    C{(min, p50, p90, max)} of C{values}, or C{None}s without any.
    """
    values = sorted(v for v in values if v is not None)
    if not values:
        return (None,) * 4

    def at(q):
        return values[min(len(values) - 1, int(q * len(values)))]

    return values[0], at(0.5), at(0.9), values[-1]


def cpu_line(used, wall):
    """
    Where the CPU went over C{wall} seconds, as one line.
    """
    order = sorted(used, key=lambda k: (k == "machine", k))
    return ", ".join(f"{k} {used[k]:.2f} s ({100 * used[k] / wall:.0f}%)"
                     for k in order)


def fmt_spread(values):
    return " / ".join("n/a" if v is None else f"{v:.2f}" for v in values)


class Gate:
    """
    One gate process of the run and its ports.
    """

    def __init__(self, gate_id, ports):
        self.id = gate_id
        self.tcp, self.ws, self.api, self.metrics = ports
        self.child = None
        self.stopped_at = None


class ClusterRun(harness.Run):
    """
    A L{harness.Run} with several gates on Redis instead of one gate.
    """

    def __init__(self, reactor, args, title):
        harness.Run.__init__(self, reactor, args, title)
        self.gates = {}
        self.prefix = f"mmogate-bench-{secrets.token_hex(6)}:"
        self.auth_secret = secrets.token_hex(32)

    @defer.inlineCallbacks
    def start_cluster(self, gate_ids):
        before = harness.machine_cpu()
        yield sleep(self.reactor, 1.0)
        after = harness.machine_cpu()
        busy = (after[0] - before[0]) / max(after[1] - before[1], 1e-9)
        self.busy_before = busy
        print(f"machine busy before starting: {100 * busy:.0f}% of "
              f"{os.cpu_count()} cores"
              + ("  <- other processes are running; figures will be "
                 "disturbed" if busy > 0.1 else ""), flush=True)
        ports = harness.free_ports(1 + 4 * len(gate_ids))
        self.backend_port = ports[0]
        for n, gate_id in enumerate(gate_ids):
            self.gates[gate_id] = Gate(gate_id, ports[1 + 4 * n:5 + 4 * n])
        last = self.gates[gate_ids[-1]]
        self.backend = self.spawn(
            "backend",
            [sys.executable, "-m", "backend",
             "--listen", f"tcp:{self.backend_port}:interface={HOST}",
             "--api-url", f"http://{HOST}:{last.api}"],
            env={"MMOGATE_API_KEY": self.api_key})
        yield self._wait_port(self.backend, self.backend_port, 20)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        cmd = [twistd] if os.path.exists(twistd) else [
            sys.executable, "-c", "import sys; from twisted.scripts.twistd "
            "import run; sys.argv[0] = 'twistd'; run()"]
        for gate in self.gates.values():
            config = os.path.join(self.dir, f"gate-{gate.id}.toml")
            with open(config, "w") as f:
                f.write(self.cluster_config(gate))
            profile = []
            if getattr(self.args, "gate_profile", None) \
                    and gate.id == gate_ids[-1]:
                # twistd's cProfile of the gate that takes the clients,
                # saved when it stops; inflates its CPU.
                profile = ["--profile",
                           os.path.abspath(self.args.gate_profile),
                           "--profiler", "cprofile", "--savestats"]
            gate.child = self.spawn(f"gate-{gate.id}",
                                    cmd + ["-n", "--pidfile="] + profile
                                    + ["mmogate", "--config", config])
            gate.child.ended.addCallback(
                lambda _, gate=gate: setattr(gate, "stopped_at",
                                             time.time()))
        for gate in self.gates.values():
            yield self._wait_gate(gate, 30)

    def cluster_config(self, gate):
        backlog = 4096
        return "\n".join([
            "[gate]",
            f'id = "{gate.id}"',
            "[listen]",
            f'tcp = "tcp:{gate.tcp}:interface={HOST}:backlog={backlog}"',
            f'ws = "tcp:{gate.ws}:interface={HOST}:backlog={backlog}"',
            f'api = "tcp:{gate.api}:interface={HOST}"',
            f'metrics = "tcp:{gate.metrics}:interface={HOST}"',
            "[backend]",
            f'url = "http://{HOST}:{self.backend_port}"',
            "[api]",
            f'key = "{self.api_key}"',
            "[auth]",
            f'secret = "{self.auth_secret}"',
            "[limits]",
            # Every client comes from 127.0.0.1.
            "connect_rate = 1000000.0",
            "connect_burst = 1000000",
            "max_per_ip = 1000000",
            "[store]",
            'kind = "redis"',
            f'redis_url = "{self.args.redis_url}"',
            f'redis_prefix = "{self.prefix}"',
            "[drain]",
            f"jitter = {self.args.jitter}",
            f"close_after = {self.args.close_after}",
            "[shutdown]",
            "grace = 3.0",
            "",
        ])

    @defer.inlineCallbacks
    def _wait_gate(self, gate, timeout):
        deadline = time.monotonic() + timeout
        yield self._wait_port(gate.child, gate.metrics, timeout)
        while True:
            status = None
            try:
                conn = yield httpc.connect(self.reactor, HOST, gate.metrics,
                                           timeout=5)
                status, _ = yield conn.request("GET", "/ready")
                conn.close()
            except httpc.HTTPError:
                pass
            if status == 200:
                yield self._wait_port(gate.child, gate.tcp, 5)
                yield self._wait_port(gate.child, gate.ws, 5)
                return
            if not gate.child.running:
                raise BenchError(f"gate {gate.id} exited "
                                 f"({gate.child.exit}):\n"
                                 f"{gate.child.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"gate {gate.id} not ready after "
                                 f"{timeout}s (/ready {status}):\n"
                                 f"{gate.child.log_tail()}")
            yield sleep(self.reactor, 0.2)

    @defer.inlineCallbacks
    def start_clients(self, mode, gate_ids, clients, procs, deadline):
        """
        C{clients} L{bench.proofload} clients over C{procs} processes,
        on the gates C{gate_ids} (in that order); fires with their C{ready}
        events.
        """
        ports = json.dumps([[self.gates[g].tcp, self.gates[g].ws]
                            for g in gate_ids])
        for i, (first, count) in enumerate(self.split(clients, procs)):
            argv = [sys.executable, "-m", "bench.proofload", "--mode", mode,
                    "--gates", ports, "--first", str(first), "--count",
                    str(count), "--deadline", str(deadline),
                    "--ws-every", str(self.args.ws_every)]
            worker = self.spawn(f"load{i}", argv, on_event=self._event)
            worker.status = {"bound": 0, "resumed": 0, "handed": 0,
                             "closed": 0}
            self.workers.append(worker)
        ready = yield self.gather("ready", 120 + clients / 10)
        return ready

    def _event(self, child, event):
        if event.get("ev") == "s":
            child.status = event
            return
        harness.Run._event(self, child, event)

    def total(self, key):
        return sum(w.status[key] for w in self.workers)

    @defer.inlineCallbacks
    def wait_for(self, condition, what, timeout):
        until = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > until:
                raise BenchError(f"timed out after {timeout:g}s waiting for "
                                 f"{what}")
            dead = [w for w in self.workers if not w.running]
            if dead:
                raise BenchError(f"a load process exited: {dead[0].exit}\n"
                                 f"{dead[0].log_tail()}")
            yield sleep(self.reactor, 0.05)

    @defer.inlineCallbacks
    def finals(self):
        events = yield self.command("final", "final", timeout=60)
        clients = {}
        for event in events:
            clients.update(event["clients"])
        return clients

    @defer.inlineCallbacks
    def records(self, gate, names, conns=20):
        """
        C{GET /v1/players/{id}} of each of C{names} on C{gate}.
        """
        found = {}
        queue = iter(names)
        auth = b"Authorization: Bearer " + self.api_key.encode("ascii")

        @defer.inlineCallbacks
        def worker():
            conn = yield httpc.connect(self.reactor, HOST, gate.api,
                                       timeout=CALL_TIMEOUT)
            try:
                for name in queue:
                    status, body = yield conn.request(
                        "GET", f"/v1/players/{name}", b"", (auth,))
                    found[name] = json.loads(body) if status == 200 \
                        else {"status": status}
            finally:
                conn.close()

        yield defer.gatherResults([worker() for _ in range(conns)],
                                  consumeErrors=True)
        return found

    def start_sampling(self, interval=0.25):
        """
        Sample every process's CPU seconds (and the machine's) every
        C{interval}, keeping the last value of a process that has exited.
        """
        self.cpu_seen = {}

        def sample():
            procs = {f"gate {g.id}": g.child for g in self.gates.values()}
            procs["backend"] = self.backend
            for w in self.workers:
                procs[w.name] = w
            for name, child in procs.items():
                value = harness.proc_cpu(child.pid)
                if value is not None:
                    self.cpu_seen[name] = value
            self.cpu_seen["machine"] = harness.machine_cpu()[0]
            self.cpu_seen["redis"] = _redis_cpu()

        self._sampler = LoopingCall(sample)
        self._sampler.clock = self.reactor
        self._sampler.start(interval)

    def cpu_mark(self):
        return dict(self.cpu_seen)

    @staticmethod
    def cpu_between(before, after):
        """
        CPU seconds used between two L{cpu_mark}s, by process name (load
        processes summed as C{load}).
        """
        used = {}
        for name, value in after.items():
            if value is None or before.get(name) is None:
                continue
            key = "load" if name.startswith("load") else name
            used[key] = used.get(key, 0.0) + value - before[name]
        return used

    @defer.inlineCallbacks
    def _shutdown_steps(self):
        self.finished = True
        sampler = getattr(self, "_sampler", None)
        if sampler is not None and sampler.running:
            sampler.stop()
        for w in self.workers:
            if w.running:
                w.send({"cmd": "exit"})
                try:
                    w.transport.closeStdin()
                except Exception:
                    pass
        for w in self.workers:
            yield self._stop_child(w, first=None, wait=10)
        for gate in self.gates.values():
            if gate.child is not None:
                yield self._stop_child(gate.child, "TERM", 15)
        if self.backend is not None:
            yield self._stop_child(self.backend, "TERM", 10)
        try:
            yield delete_prefix(self.args.redis_url, self.prefix)
        except Exception as e:
            print(f"could not delete the Redis keys {self.prefix}*: {e}",
                  flush=True)


def _redis_cpu():
    """
    CPU seconds of the local redis-server, if one is found in C{/proc}
    (for the report only).
    """
    try:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        if f.read().strip() == "redis-server":
                            return harness.proc_cpu(int(pid))
                except OSError:
                    continue
    except OSError:
        pass
    return None


@defer.inlineCallbacks
def delete_prefix(url, prefix):
    """
    Delete every Redis key under C{prefix} (SCAN, never KEYS).
    """
    parts = urlsplit(url)
    redis = yield txredisapi.Connection(
        parts.hostname or HOST, parts.port or 6379,
        dbid=int(parts.path.strip("/") or 0), reconnect=False,
        charset=None, convertNumbers=False)
    try:
        cursor = 0
        while True:
            cursor, keys = yield redis.scan(cursor, prefix + "*", 500)
            if keys:
                yield redis.delete(*keys)
            if int(cursor) == 0:
                break
    finally:
        yield redis.disconnect()


class Publisher:
    """
    Persistent pushes to C{batch} players at a time, going round the
    players, through the push API of each gate in C{gates}: one call in
    flight per API, started every C{interval} seconds (later when the
    previous answer is late), until L{stop}; an API whose gate is gone is
    left.

    @ivar acked: player -> pushes the API answered 200 for, counting the
        player C{delivered} or C{queued}.
    @ivar uncertain: player -> calls whose answer was lost (the gate may
        or may not have carried them out).
    """

    def __init__(self, reactor, run, gates, names, batch, interval):
        self.reactor = reactor
        self.run = run
        self.gates = gates
        self.names = names
        self.batch = batch
        self.interval = interval
        self.acked = Counter()
        self.uncertain = Counter()
        self.answers = Counter()
        self.outcomes = Counter()
        self.calls = []  # (api, sent at, outcome, delivered, queued)
        self.latency = []
        self.running = False
        self._cursor = 0
        self._loops = []
        self.auth = b"Authorization: Bearer " + run.api_key.encode("ascii")

    def start(self):
        self.running = True
        self._loops = [self._loop(gate) for gate in self.gates]

    def stop(self):
        self.running = False
        return defer.gatherResults(self._loops, consumeErrors=True)

    def ok_calls(self, api=None, since=None, until=None):
        return sum(1 for a, t, outcome, _, _ in self.calls
                   if outcome == "ok" and (api is None or a == api)
                   and (since is None or t >= since)
                   and (until is None or t <= until))

    def _next(self):
        n = len(self.names)
        first = self._cursor * self.batch % n
        self._cursor += 1
        return [self.names[(first + i) % n]
                for i in range(min(self.batch, n))]

    @defer.inlineCallbacks
    def _loop(self, gate):
        conn = None
        while self.running:
            started = time.time()
            if conn is None or conn.lost:
                try:
                    conn = yield httpc.connect(self.reactor, HOST, gate.api,
                                               timeout=CALL_TIMEOUT)
                except Exception:
                    # The gate is gone: nothing more through it.
                    self.outcomes[gate.id, "refused"] += 1
                    return
            players = self._next()
            body = json.dumps({"players": players, "route": "proof",
                               "data": {"via": gate.id}}).encode("utf-8")
            try:
                status, raw = yield conn.request(
                    "POST", "/v1/push", body,
                    (self.auth, b"Content-Type: application/json"))
            except httpc.HTTPError:
                self._record(gate, started, "uncertain", players)
                continue
            self.latency.append(time.time() - started)
            if status == 503:
                # Nothing was sent (the store away, or the gate stopping).
                self._record(gate, started, "unavailable", None)
            elif status != 200:
                self._record(gate, started, f"http_{status}", players)
            else:
                answer = json.loads(raw)
                if answer["unknown"] or answer["dropped"] \
                        or answer["delivered"] + answer["queued"] \
                        != len(players):
                    self._record(gate, started, "bad_answer", players)
                else:
                    self.acked.update(players)
                    self.answers["delivered"] += answer["delivered"]
                    self.answers["queued"] += answer["queued"]
                    self.calls.append((gate.id, started, "ok",
                                       answer["delivered"],
                                       answer["queued"]))
                    self.outcomes[gate.id, "ok"] += 1
            wait = self.interval - (time.time() - started)
            if wait > 0 and self.running:
                yield sleep(self.reactor, wait)
        if conn is not None:
            conn.close()

    def _record(self, gate, started, outcome, uncertain_players):
        self.outcomes[gate.id, outcome] += 1
        self.calls.append((gate.id, started, outcome, 0, 0))
        if uncertain_players:
            self.uncertain.update(uncertain_players)


def check(clients, records, publisher, target, moved):
    """
    Every client's run against the store's C{last_seq} and the API's
    answers; C{moved} clients must have resumed (never logged in afresh)
    and every client must be bound to gate C{target}.

    @return: C{(ok, problems Counter, examples)}.
    """
    problems = Counter()
    examples = []

    def bad(kind, name, text):
        problems[kind] += 1
        if len(examples) < 8:
            examples.append(f"{name}: {text}")

    for name, rep in sorted(clients.items()):
        record = records.get(name, {})
        last = record.get("last_seq")
        if last is None:
            bad("no_record", name, f"GET /v1/players answered {record}")
            continue
        low = publisher.acked[name]
        high = low + publisher.uncertain[name]
        if not low <= last <= high:
            bad("store_vs_api", name, f"store numbered {last}, API "
                f"acknowledged {low} (+{high - low} uncertain)")
        if rep["count"] != last or rep["last"] != last or rep["anomalies"]:
            bad("lost_or_twice", name, f"handed {rep['count']} pushes, last "
                f"seq {rep['last']}, {rep['anomalies']} out of run; store "
                f"numbered {last}")
        if rep["disorder"]:
            bad("twice_on_one_connection", name,
                f"{rep['disorder']} pushes written again or out of order")
        if rep["gaps"]:
            bad("gap_notices", name, f"{rep['gaps']} gap notices")
        if not rep["connected"] or record.get("gate_id") != target \
                or not record.get("online"):
            bad("not_on_target", name, f"connected {rep['connected']} to "
                f"{rep['addr']}; store says {record.get('gate_id')}, online "
                f"{record.get('online')}")
        if rep["kicks"]:
            bad("kicked", name, f"kicks {rep['kicks']}")
        if rep["logged_in"] != 1 or rep["resume_failed"]:
            bad("logged_in_again", name, f"logged in {rep['logged_in']} "
                f"times, resume failed {rep['resume_failed']} times "
                f"({rep['codes']})")
        if name in moved and rep["resumed"] is None:
            bad("not_resumed", name, f"never resumed ({rep['codes']})")
    return not problems, problems, examples


def add_args(parser, clients):
    parser.add_argument("--clients", type=int, default=clients,
                        help="clients (default: %(default)s)")
    parser.add_argument("--procs", type=int, default=2,
                        help="load processes holding the clients "
                        "(default: %(default)s)")
    parser.add_argument("--ws-every", type=int, default=5,
                        help="every Nth client is on WebSocket, the others "
                        "on TCP; 0 for TCP only (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=100,
                        help="players per POST /v1/push (default: "
                        "%(default)s)")
    parser.add_argument("--interval", type=float, default=0.2,
                        help="seconds between push calls on each API; "
                        "with the default each player gets about one push "
                        "a second (default: %(default)s)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="Redis on 127.0.0.1 (default: %(default)s); "
                        "the run uses a key prefix of its own and deletes "
                        "it at the end")
    parser.add_argument("--jitter", type=float, default=5.0,
                        help="drain.jitter of the gates (default: "
                        "%(default)s)")
    parser.add_argument("--close-after", type=float, default=30.0,
                        help="drain.close_after of the gates (default: "
                        "%(default)s)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON to FILE")
    parser.add_argument("--gate-profile", metavar="FILE",
                        help="run gate B (the one clients go to) under "
                        "cProfile and save its stats to FILE when it stops")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run directory even when the run "
                        "succeeds")


def check_args(parser, args):
    if args.clients < 2:
        parser.error("--clients must be at least 2")
    if not 1 <= args.procs <= 16:
        parser.error("--procs must be in [1, 16]")
    if not 1 <= args.batch <= 1000:
        parser.error("--batch must be in [1, 1000]")
    if not 0 <= args.interval <= 10:
        parser.error("--interval must be in [0, 10]")
    if args.ws_every < 0:
        parser.error("--ws-every must be at least 0")
    host = urlsplit(args.redis_url).hostname
    if host not in ("127.0.0.1", "localhost"):
        parser.error("the benchmark only uses a Redis on 127.0.0.1")
