"""
The gate as a tree of services: listeners, registration, and the objects of
the seed design (SessionManager, PlayerManager, WorkerPool) between them.

Stopping follows the seed design's order: stop accepting, tell each session
(C{kick} C{shutdown}), let in-flight backend calls finish, flush lifecycle
events, stop the pool, then close the API and the backend connections.
"""

import socket
import sys

from twisted.application.service import MultiService, Service
from twisted.internet.defer import (Deferred, gatherResults, inlineCallbacks,
                                    succeed)
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogPublisher
from twisted.web.server import Site

from gate.api import API_DEPTH_ALLOWANCE, APIResource, APISite
from gate.audit import MemoryAuditLog
from gate.backend import HTTPBackend
from gate.cluster import Cluster
from gate.drain import Drainer, NotRunning
from gate.balancer import BackendSet
from gate.bans import SharedBans
from gate.events import EventSender
from gate.health import health_site
from gate.keys import load_or_create
from gate.logs import JSONLineObserver, set_gate_id
from gate.metrics import Metrics
from gate.player import PlayerManager
from gate.registration import Registrar
from gate.secure_tcp import GateSecureTCPFactory
from gate.session import SessionManager
from gate.tcp import GateTCPFactory
from gate.tokens import Tokens
from gate.websocket import WS_PATH, GateWebSocketFactory
from gate.workers import WorkerPool
from mmogate_plugins.postgres import PostgresStore

#: Where the in-process reference backend listens (port chosen by the OS).
REFERENCE_BACKEND_ENDPOINT = "tcp:0:interface=127.0.0.1"


class ListenError(Exception):
    """
    A listener cannot start; the message names its key and the reason.
    """


class Listener(Service):
    """
    One server endpoint, bound in C{privilegedStartService} so that twistd
    can bind low ports before dropping privileges; a bind failure stops
    start-up with the endpoint's error.
    """

    log = Logger()

    def __init__(self, name, description, factory, reactor):
        self.setName(name)
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self.port = None

    def privilegedStartService(self):
        Service.privilegedStartService(self)
        if self.port is not None:
            return
        try:
            endpoint = serverFromString(self._reactor, self.description)
        except Exception as e:
            raise ListenError(f"listen.{self.name}: bad endpoint "
                              f"{self.description!r}: {e}")
        d = endpoint.listen(self.factory)
        failures = []
        d.addCallbacks(self._bound, failures.append)
        if failures:
            raise ListenError(f"listen.{self.name}: cannot listen on "
                              f"{self.description!r}: "
                              f"{failures[0].getErrorMessage()}")
        if self.port is None:
            raise ListenError(f"listen.{self.name}: endpoint "
                              f"{self.description!r} did not bind at once")

    def _bound(self, port):
        self.port = port
        host = port.getHost()
        self._address = (host.host, host.port)
        self.log.info("listening for {name} on {host}:{port}", name=self.name,
                      host=host.host, port=host.port)

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        Service.startService(self)

    def stopService(self):
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return succeed(None)

    def address(self):
        """
        C{(host, port)} actually bound (still known after stopping).
        """
        return self._address


def _public_host(host):
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


def _within(d, seconds, clock):
    """
    C{d}, or nothing after C{seconds}: shutdown steps are bounded.
    """
    if seconds <= 0:
        d.addErrback(lambda _: None)
        return succeed(None)
    bounded = Deferred()
    timer = clock.callLater(seconds, lambda: bounded.called or
                            bounded.callback(None))

    def done(result):
        if timer.active():
            timer.cancel()
        if not bounded.called:
            bounded.callback(None)

    d.addBoth(done)
    return bounded


class GateService(MultiService):
    """
    One gate.

    @param config: a L{gate.config.Config}.
    @param reactor: the reactor for endpoints and time (default: the global
        reactor).
    @param backend: an L{IBackendClient} to use instead of an HTTP one.
    @param directory: an L{IPlayerDirectory} (default: in memory).
    @param mailboxes: an L{IMailboxStore} (default: in memory).
    """

    log = Logger()

    def __init__(self, config, reactor=None, backend=None, directory=None,
                 mailboxes=None):
        MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.gate_id = config["gate.id"]
        #: The Ed25519 key signing encrypted-channel handshakes, if enabled;
        #: loaded first, so that a bad key file stops start-up before
        #: anything else is built.
        self.channel_key = (load_or_create(config["encrypt.key_file"])
                            if config["listen.tcp_secure"] else None)
        self.metrics = Metrics(self.gate_id)
        self.tokens = Tokens(config["auth.secret"], reactor,
                             config["auth.resume_ttl"])
        #: PostgreSQL (store.postgres_dsn): the durable mailbox and the
        #: audit log. The first child service: it migrates the schema
        #: before any listener binds, and closes its pool last.
        self.postgres = None
        if config["store.postgres_dsn"]:
            self.postgres = PostgresStore(reactor, config,
                                          self.metrics.registry)
            self.postgres.setServiceParent(self)
            if mailboxes is None:
                mailboxes = self.postgres.mailboxes
        self.audit = (self.postgres.audit if self.postgres is not None
                      else MemoryAuditLog(config["store.audit_max"]))
        #: The Redis store (store.kind = redis): directory, mailboxes and
        #: the bus to the other gates, routed by self.cluster.
        self.store = None
        if config["store.kind"] == "redis":
            from mmogate_plugins.redis import RedisStore
            self.store = RedisStore.from_config(reactor, config)
            if directory is None:
                directory = self.store
            if mailboxes is None or (self.postgres is not None and mailboxes
                                     is self.postgres.mailboxes):
                # Redis numbers, stores and routes the pushes of every
                # gate in one step (docs/cluster.md).
                mailboxes = self.store
                if self.postgres is not None:
                    # ... and PostgreSQL keeps the durable copy
                    # (docs/persistence.md).
                    self.store.durable = self.postgres.mailboxes
        if mailboxes is None or directory is None:
            from mmogate_plugins.memory import (MemoryMailboxStore,
                                                MemoryPlayerDirectory)
            if mailboxes is None:
                mailboxes = MemoryMailboxStore(reactor,
                                               config["player.mailbox_max"],
                                               config["player.idle_timeout"])
            if directory is None:
                directory = MemoryPlayerDirectory()
        if hasattr(mailboxes, "total"):
            self.metrics.watch_mailboxes(mailboxes.total)
        self.reference = None
        self.listeners = {}
        if backend is None and config["backend.urls"]:
            # Several backends: balanced, probed and broken per backend; a
            # service here so that its health probes run while the gate does.
            backend = BackendSet.from_config(reactor, config, self.gate_id,
                                             self.metrics)
            backend.setServiceParent(self)
        elif backend is None:
            backend = HTTPBackend(reactor, config["backend.url"], self.gate_id,
                                  config["backend.timeout"],
                                  config["backend.secret"],
                                  config["backend.max_connections"],
                                  max_body=config["backend.max_body"],
                                  max_head=config["backend.max_head"])
            if not config["backend.url"]:
                self._add_reference_backend()
        self.backend = backend
        self.events = EventSender(reactor, backend, self.gate_id,
                                  config["backend.events_max"],
                                  config["backend.events_retry_max"],
                                  self.metrics)
        self.pool = WorkerPool(reactor, config["workers.min"],
                               config["workers.max"],
                               config["workers.grow_queue"],
                               config["workers.idle_timeout"],
                               config["workers.max_queue"], self.metrics)
        self.players = PlayerManager(reactor, self.gate_id, directory,
                                     mailboxes, self.events,
                                     config["player.idle_timeout"],
                                     self.metrics,
                                     bans=(SharedBans(self.store, reactor,
                                                      config["auth.resume_ttl"])
                                           if directory is self.store
                                           and self.store is not None
                                           else None),
                                     token_ttl=config["auth.resume_ttl"])
        self.sessions = SessionManager(reactor, config, self.players,
                                       self.pool, backend, self.tokens,
                                       self.metrics)
        self.cluster = None
        if self.store is not None:
            self.cluster = Cluster(reactor, self.gate_id, self.store,
                                   self.players, self.sessions,
                                   config["player.idle_timeout"],
                                   config["store.gate_ttl"])
        self.players.audit = self.sessions.audit = self.audit
        self._listen("api", config["listen.api"],
                     APISite(APIResource(self, config["api.key"],
                                         config["session.max_depth"]
                                         + API_DEPTH_ALLOWANCE),
                             config["api.max_body"],
                             config["api.request_timeout"]))
        if config["listen.metrics"]:
            self._listen("metrics", config["listen.metrics"],
                         health_site(self))
        if config["listen.tcp"]:
            self._listen("tcp", config["listen.tcp"],
                         GateTCPFactory(self.sessions,
                                        config["session.max_frame"], reactor,
                                        config["session.max_outbuf"]))
        if config["listen.ws"]:
            self._listen("ws", config["listen.ws"],
                         GateWebSocketFactory(self.sessions,
                                              config["session.max_frame"],
                                              reactor,
                                              config["session.max_outbuf"],
                                              min(10.0, config[
                                                  "session.login_timeout"])))
        if config["listen.tcp_secure"]:
            self._listen("tcp_secure", config["listen.tcp_secure"],
                         GateSecureTCPFactory(
                             self.sessions, config["session.max_frame"],
                             reactor, self.channel_key,
                             max_outbuf=config["session.max_outbuf"],
                             rekey_frames=config["encrypt.rekey_frames"],
                             rekey_seconds=config["encrypt.rekey_seconds"],
                             handshake_timeout=config[
                                 "session.login_timeout"]))
        self.registrar = Registrar(reactor, backend, self.gate_id,
                                   config["backend.register_interval"],
                                   self.describe)
        self.registrar.setName("registrar")
        self.registrar.setServiceParent(self)
        #: C{up}, C{draining} or C{down}, as announced to backends.
        self.state = "up"
        self.metrics.state("up")
        self.drainer = Drainer(reactor, self.sessions, config["drain.jitter"])
        #: Called once a drain is over: stops this service; C{twistd}
        #: (L{gate.tap}) makes it stop the reactor, as SIGTERM does, so the
        #: process exits 0.
        self.when_drained = self.stopService
        self._json_log = None
        self._stopping = None

    def _add_reference_backend(self):
        from backend.reference import ReferenceBackend
        self.reference = ReferenceBackend(self.reactor,
                                          api_key=self.config["api.key"],
                                          secret=self.config["backend.secret"]
                                          or None)
        site = Site(self.reference.resource())
        site.noisy = False
        site.log = lambda request: None
        self._listen("backend", REFERENCE_BACKEND_ENDPOINT, site)

    def _listen(self, name, description, factory):
        listener = Listener(name, description, factory, self.reactor)
        listener.setServiceParent(self)
        self.listeners[name] = listener

    def address(self, name):
        """
        C{(host, port)} the listener C{name} is bound to.
        """
        return self.listeners[name].address()

    def describe(self):
        """
        C{(api_url, listen)} as announced to backends.
        """
        api_url = self.config["gate.api_url"]
        if not api_url:
            host, port = self.address("api")
            scheme = "https" if self._tls("api") else "http"
            api_url = f"{scheme}://{_public_host(host)}:{port}"
        listen = list(self.config["gate.advertise"])
        if not listen:
            if "tcp" in self.listeners:
                host, port = self.address("tcp")
                scheme = "tls" if self._tls("tcp") else "tcp"
                listen.append(f"{scheme}://{_public_host(host)}:{port}")
            if "ws" in self.listeners:
                host, port = self.address("ws")
                scheme = "wss" if self._tls("ws") else "ws"
                listen.append(f"{scheme}://{_public_host(host)}:{port}"
                              f"{WS_PATH}")
            if "tcp_secure" in self.listeners:
                host, port = self.address("tcp_secure")
                listen.append(f"tcp+enc://{_public_host(host)}:{port}")
        return api_url, listen

    def _tls(self, name):
        """
        Whether listener C{name} speaks TLS (an C{ssl:} endpoint string).
        """
        return self.listeners[name].description.split(":", 1)[0] == "ssl"

    def privilegedStartService(self):
        # Listeners bind here, in the order added: the reference backend
        # and the API before the client listeners.
        MultiService.privilegedStartService(self)
        self._wire_reference()

    def _wire_reference(self):
        if self.reference is not None and "backend" in self.listeners \
                and self.listeners["backend"].port is not None:
            host, port = self.address("backend")
            self.backend.url = f"http://{host}:{port}"
            api_host, api_port = self.address("api")
            if api_host in ("0.0.0.0", "::"):
                api_host = "127.0.0.1"
            self.reference.api_url = f"http://{api_host}:{api_port}"

    def startService(self):
        set_gate_id(self.gate_id)
        path = self.config["log.json_file"]
        if path:
            # twistd replaces sys.stdout with a log writer: writing our lines
            # there would log them again, forever.
            stream = sys.__stdout__ if path == "-" else open(path, "a")
            self._json_log = (JSONLineObserver(stream, self.gate_id), stream)
            globalLogPublisher.addObserver(self._json_log[0])
        for listener in self.listeners.values():
            if listener.port is None:
                listener.privilegedStartService()
        self._wire_reference()
        MultiService.startService(self)
        if self.cluster is not None:
            self.cluster.start()
        self.log.info("gate {gate_id} started", gate_id=self.gate_id)

    def not_ready_because(self):
        """
        Why the gate should not get new clients now, or C{None}.
        """
        if not self.running:
            return "not running"
        if self.drainer.draining:
            return "draining"
        if not self.sessions.accepting:
            return "not accepting clients"
        if getattr(self.backend, "reachable", None) is False:
            return "backend unreachable"
        if self.store is not None and not self.store.reachable:
            return "store unreachable"
        if (self.postgres is not None and not self.postgres.reachable
                and (self.players.mailboxes is self.postgres.mailboxes
                     or getattr(self.players.mailboxes, "durable", None)
                     is self.postgres.mailboxes)):
            # (The audit log alone waits for it in a bounded buffer.)
            return f"PostgreSQL unreachable: {self.postgres.problem}"
        return None

    def drain(self, target, deadline=None):
        """
        C{POST /v1/drain}: refuse new clients, tell every session to
        reconnect to C{target} (spread over C{drain.jitter} seconds), and
        stop once no session is left or C{deadline} seconds have passed
        (default C{drain.deadline}); the sessions left then are kicked
        C{shutdown} as in any stop.

        @return: whether this call started the drain (C{False} when the gate
            was already draining: the first drain goes on unchanged).
        @raise NotRunning: the gate is stopping.
        """
        if not self.running or self._stopping is not None:
            raise NotRunning("the gate is stopping")
        if self.drainer.draining:
            return False
        if deadline is None:
            deadline = self.config["drain.deadline"]
        self.state = "draining"
        self.metrics.state("draining")
        self.log.info("gate {gate_id} draining to {target}, deadline "
                      "{deadline}s", gate_id=self.gate_id, target=target,
                      deadline=deadline)
        announced = self.registrar.announce("draining")
        self.drainer.drain(target, deadline).addCallback(self._drained,
                                                         announced)
        return True

    def _drained(self, why, announced):
        self.log.info("gate {gate_id} drained ({why}); stopping",
                      gate_id=self.gate_id, why=why)
        # After the 'draining' registration (bounded), so that 'down' does
        # not overtake it; and not within the API call that began the drain.
        _within(announced, 1.0, self.reactor).addCallback(
            lambda _: self.reactor.callLater(0, self.when_drained))

    def stopService(self):
        if self._stopping is None:
            self._stopping = self._stop()
        return self._stopping

    @inlineCallbacks
    def _stop(self):
        clock = self.reactor
        grace = self.config["shutdown.grace"]
        deadline = clock.seconds() + grace

        def left():
            return max(0.0, deadline - clock.seconds())

        Service.stopService(self)
        self.log.info("gate {gate_id} stopping", gate_id=self.gate_id)
        # 1. Stop accepting.
        self.sessions.accepting = False
        self.drainer.stop()
        self.state = "down"
        self.metrics.state("down")
        yield gatherResults([self.listeners[name].stopService()
                             for name in ("tcp", "ws", "tcp_secure")
                             if name in self.listeners])
        # 2. Tell each session, and wait for them to go.
        self.sessions.kick_all("shutdown", "the gate is shutting down")
        yield _within(self.sessions.wait_empty(), left(), clock)
        # 3. Finish (or give up on) in-flight backend calls.
        yield _within(self.pool.stop(), left(), clock)
        # 4. Flush lifecycle events and say goodbye to the backend.
        self.players.stop()
        yield _within(self.events.flush(), left(), clock)
        self.events.stop()
        yield _within(self.registrar.announce("down"),
                      max(left(), min(1.0, grace)), clock)
        # Leave the cluster once the sessions' releases are answered.
        if self.cluster is not None:
            yield _within(self.cluster.stop(), max(left(), min(1.0, grace)),
                          clock)
        # 5. Everything else, in reverse order of starting.
        remaining = [s for s in reversed(list(self))
                     if s.running and s is not self]
        for service in remaining:
            yield service.stopService()
        yield self.backend.close()
        if self.reference is not None:
            yield self.reference.close()
        if self._json_log is not None:
            observer, stream = self._json_log
            globalLogPublisher.removeObserver(observer)
            if stream is not sys.__stdout__:
                stream.close()
        self.log.info("gate {gate_id} stopped", gate_id=self.gate_id)
