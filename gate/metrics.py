"""
Prometheus metrics of one gate, in a registry of its own so several gates
(in tests, say) can live in one process.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gate import errors

#: Distinct route labels kept before the rest are counted as 'other', so a
#: client inventing route names cannot grow the metrics without bound.
MAX_ROUTE_LABELS = 200

#: Request outcomes kept as labels: success and the gate's own codes; any
#: other code (a backend's) is counted as 'backend_code'.
OUTCOMES = frozenset({"ok", errors.BAD_REQUEST, errors.NOT_AUTHENTICATED,
                      errors.AUTH_FAILED, errors.RESUME_REJECTED,
                      errors.RATE_LIMITED, errors.BUSY,
                      errors.BACKEND_UNAVAILABLE, errors.BACKEND_TIMEOUT,
                      errors.BACKEND_ERROR, errors.ROUTE_NOT_FOUND,
                      errors.INTERNAL})


#: The states of a gate, as announced to backends (PROTOCOL.md section 4).
GATE_STATES = ("up", "draining", "down")


class Metrics:
    def __init__(self, gate_id):
        self.registry = r = CollectorRegistry()
        self.sessions = Gauge("mmogate_sessions", "Open client sessions",
                              ["transport"], registry=r)
        self.players_gauge = Gauge("mmogate_players", "Players known to this "
                                   "gate", ["state"], registry=r)
        self.requests = Counter("mmogate_requests", "Client requests served",
                                ["route", "outcome"], registry=r)
        self.latency = Histogram(
            "mmogate_request_seconds", "Time to answer a request", ["route"],
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                     5, 10, 30), registry=r)
        self.pushes = Counter("mmogate_pushes", "Pushes by outcome",
                              ["outcome"], registry=r)
        self.pool_size = Gauge("mmogate_workers", "Workers in the pool",
                               registry=r)
        self.pool_busy = Gauge("mmogate_workers_busy", "Workers running a "
                               "backend call", registry=r)
        self.pool_queue = Gauge("mmogate_worker_queue", "Requests waiting for "
                                "a worker", registry=r)
        self.mailbox = Gauge("mmogate_mailbox_messages", "Persistent pushes "
                             "retained in mailboxes", registry=r)
        self.kicks = Counter("mmogate_kicks", "Sessions kicked", ["reason"],
                             registry=r)
        self.bad = Counter("mmogate_bad_input", "Client input refused",
                           ["code"], registry=r)
        self.refused = Counter("mmogate_connections_refused", "Client "
                               "connections refused by limits.max_connections, "
                               "limits.max_per_ip or limits.connect_rate",
                               ["reason"], registry=r)
        self.limited = Counter("mmogate_sessions_limited", "Sessions closed "
                               "by a limit (login_timeout, rate_limited)",
                               ["reason"], registry=r)
        self.events = Counter("mmogate_lifecycle_events", "Lifecycle events to "
                              "the backend", ["outcome"], registry=r)
        self.gate_state = Gauge("mmogate_gate_state", "1 for the state the "
                                "gate is in (up, draining, down), 0 for the "
                                "others", ["state"], registry=r)
        self.reconnects = Counter("mmogate_reconnects", "reconnect envelopes "
                                  "sent to clients", ["reason"], registry=r)
        # Several backends (backend.urls), labelled host:port: bounded by
        # the configuration.
        self.backend_calls = Counter("mmogate_backend_requests", "Calls "
                                     "(login, rpc, events) to each of "
                                     "backend.urls by outcome",
                                     ["backend", "outcome"], registry=r)
        self.backend_breaker = Gauge("mmogate_backend_breaker", "Circuit "
                                     "breaker of each of backend.urls: 0 "
                                     "closed, 1 half-open, 2 open",
                                     ["backend"], registry=r)
        self.backend_healthy = Gauge("mmogate_backend_healthy", "1 while a "
                                     "backend of backend.urls passes its "
                                     "health probes", ["backend"], registry=r)
        self.backend_retries = Counter("mmogate_backend_retries", "Calls on "
                                       "idempotent routes sent again after a "
                                       "failure", registry=r)
        self._routes = set()
        self._request_children = {}
        self._push_outcomes = {outcome: self.pushes.labels(outcome) for outcome
                               in ("delivered", "queued", "dropped",
                                   "unknown")}

    def session_opened(self, transport):
        self.sessions.labels(transport).inc()

    def session_closed(self, transport):
        self.sessions.labels(transport).dec()

    def players(self, online, offline):
        self.players_gauge.labels("online").set(online)
        self.players_gauge.labels("offline").set(offline)

    def request(self, route, outcome, seconds):
        children = self._request_children.get((route, outcome))
        if children is None:
            if outcome not in OUTCOMES:
                # A code of the backend's own: any string it likes.
                outcome = "backend_code"
            label = route
            if outcome == errors.ROUTE_NOT_FOUND:
                # Invented routes must not use up the labels of real ones.
                label = "unknown_route"
            elif route not in self._routes:
                if len(self._routes) >= MAX_ROUTE_LABELS:
                    label = "other"
                else:
                    self._routes.add(route)
            children = (self.requests.labels(label, outcome),
                        self.latency.labels(label))
            if len(self._request_children) < 4 * MAX_ROUTE_LABELS:
                # Label lookups cost more than the updates; keep them.
                self._request_children[(route, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)

    def pushed(self, result):
        """
        Count the outcomes of one push request (one call, however many
        players: label lookups cost more than the increments).
        """
        pushes = self._push_outcomes
        for outcome, n in (("delivered", result.delivered),
                           ("queued", result.queued),
                           ("dropped", result.dropped),
                           ("unknown", len(result.unknown))):
            if n:
                pushes[outcome].inc(n)

    def broadcast(self, n):
        if n:
            self._push_outcomes["delivered"].inc(n)

    def pool(self, size, busy, queued):
        self.pool_size.set(size)
        self.pool_busy.set(busy)
        self.pool_queue.set(queued)

    def kicked(self, reason):
        self.kicks.labels(reason).inc()

    def bad_input(self, code):
        self.bad.labels(code).inc()

    def connection_refused(self, reason):
        self.refused.labels(reason).inc()

    def session_limited(self, reason):
        self.limited.labels(reason).inc()

    def event(self, outcome):
        self.events.labels(outcome).inc()

    def watch_backend(self, label, breaker, healthy, outcomes):
        """
        Read one backend's breaker and health gauges from C{breaker()} and
        C{healthy()} at each scrape.

        @return: its call counters, by each of C{outcomes}.
        """
        self.backend_breaker.labels(label).set_function(breaker)
        self.backend_healthy.labels(label).set_function(healthy)
        return {outcome: self.backend_calls.labels(label, outcome)
                for outcome in outcomes}

    def backend_retried(self):
        self.backend_retries.inc()

    def state(self, state):
        for name in GATE_STATES:
            self.gate_state.labels(name).set(1 if name == state else 0)

    def reconnect_sent(self, reason):
        self.reconnects.labels(reason).inc()

    def watch_mailboxes(self, total):
        """
        Read the mailbox gauge from C{total()} at each scrape.
        """
        self.mailbox.set_function(total)
