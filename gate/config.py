"""
Gate configuration: the keys of PROTOCOL.md section 7, their types and
defaults, loaded from TOML.

Every key the gate reads is declared once in L{SCHEMA}; loading checks names
and types up front so that a typo stops start-up with a line naming the key
instead of surfacing hours later as a default silently used.
"""

import os
import secrets
import socket
import tomllib
from urllib.parse import urlsplit
from dataclasses import dataclass


class ConfigError(Exception):
    """
    The configuration cannot be used; the message names the key.
    """


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: object
    doc: str
    minimum: float | None = None
    choices: tuple = ()
    #: The element type of a list key.
    item: type = str
    #: Required when a config file is given; the built-in development
    #: defaults (no file) supply a value.
    required: bool = False


def _gate_id():
    return socket.gethostname() or "gate"


SCHEMA = (
    Key("gate.id", str, None, "This gate's name, unique among gates sharing a store "
        "(default: the host name)."),
    Key("gate.api_url", str, "", "The push API URL announced to backends in "
        "POST /gates (default: derived from listen.api)."),
    Key("gate.advertise", list, [], "Client addresses announced to backends as "
        "'listen' (default: derived from listen.tcp and listen.ws)."),
    Key("listen.tcp", str, "tcp:8080:interface=127.0.0.1",
        "Length-framed TCP listener (Twisted endpoint string, '' to disable)."),
    Key("listen.ws", str, "tcp:8081:interface=127.0.0.1",
        "WebSocket listener, path /ws ('' to disable)."),
    Key("listen.api", str, "tcp:8090:interface=127.0.0.1",
        "Push and admin API listener."),
    Key("listen.metrics", str, "tcp:9090:interface=127.0.0.1",
        "/metrics, /health and /ready ('' to disable)."),
    Key("listen.tcp_secure", str, "", "Length-framed TCP listener with the "
        "encrypted channel of PROTOCOL.md section 8 ('' to disable)."),
    Key("encrypt.key_file", str, "mmogate-ed25519.pem", "The gate's Ed25519 "
        "private key (PEM) for the encrypted channel; created with mode 0600 "
        "when missing."),
    Key("encrypt.rekey_frames", int, 100000, "Frames the gate sends under one "
        "key before it rotates it.", minimum=1),
    Key("encrypt.rekey_seconds", float, 3600.0, "Seconds the gate sends under "
        "one key before it rotates it.", minimum=0.01),
    Key("limits.max_connections", int, 100000, "Client connections open at "
        "once, over all client listeners; more are closed at once.",
        minimum=1),
    Key("limits.max_per_ip", int, 1000, "Client connections open at once "
        "from one IP address.", minimum=1),
    Key("limits.connect_rate", float, 20.0, "New client connections per "
        "second from one IP address (IPv6: one /64), over all client "
        "listeners (token bucket); more are refused busy.", minimum=0.001),
    Key("limits.connect_burst", int, 50, "New client connections one IP "
        "address may open at once above limits.connect_rate.", minimum=1),
    Key("backend.url", str, "", "Base URL of the game backend; unset (with "
        "backend.urls unset) runs the bundled reference backend in-process."),
    Key("backend.urls", list, [], "Several backend base URLs, instead of "
        "backend.url."),
    Key("backend.weights", list, [], "One weight per backend.urls entry, for "
        "backend.balance = weighted (default: all 1).", item=int),
    Key("backend.balance", str, "round_robin", "How requests are spread over "
        "backend.urls.", choices=("round_robin", "weighted",
                                  "least_outstanding", "player_hash")),
    Key("backend.idempotent_routes", list, [], "Routes whose requests may be "
        "sent again (to another backend) after a failure."),
    Key("backend.retries", int, 2, "Extra attempts for a request on an "
        "idempotent route.", minimum=0),
    Key("backend.retry_backoff", float, 0.05, "Base of the exponential "
        "backoff between retries, in seconds (with full jitter).",
        minimum=0),
    Key("backend.health_path", str, "/health", "Path probed with GET on each "
        "backend; any answer below 500 counts as healthy."),
    Key("backend.health_interval", float, 5.0, "Seconds between health "
        "probes of each backend (0 turns them off).", minimum=0),
    Key("backend.breaker_failures", int, 5, "Consecutive failures (no "
        "connection, timeout, 5xx) that open a backend's circuit breaker.",
        minimum=1),
    Key("backend.breaker_reset", float, 10.0, "Seconds an open circuit "
        "breaker waits before letting one trial request through.",
        minimum=0.01),
    Key("backend.timeout", float, 10.0, "Seconds a backend call may take.",
        minimum=0.001),
    Key("backend.secret", str, "", "HMAC-SHA256 key for X-Mmogate-Signature "
        "('' sends no signature)."),
    Key("backend.register_interval", float, 30.0, "Seconds between POST /gates "
        "registrations (0 turns them off).", minimum=0),
    Key("backend.max_connections", int, 256, "Persistent HTTP connections kept "
        "to the backend.", minimum=1),
    Key("backend.max_body", int, 4194304, "Largest backend answer in bytes; "
        "a larger one is backend_error.", minimum=1024),
    Key("backend.max_head", int, 65536, "Largest status line and headers of "
        "a backend answer in bytes; a larger one is backend_error.",
        minimum=1024),
    Key("backend.events_max", int, 100000, "Lifecycle events kept for delivery "
        "while the backend is away; the oldest are dropped beyond it.", minimum=1),
    Key("backend.events_retry_max", float, 60.0, "Longest backoff between "
        "lifecycle event delivery attempts.", minimum=0.01),
    Key("api.key", str, "", "Bearer token for the push and admin API.",
        required=True),
    Key("api.max_body", int, 1048576, "Largest API request body in bytes.",
        minimum=2),
    Key("api.request_timeout", float, 30.0, "Seconds one request to the API "
        "or metrics listener may take to arrive whole, from its first byte; "
        "a slower one (slowloris) is closed.", minimum=0.01),
    Key("auth.secret", str, "", "HS256 key for auth tokens and resume tokens.",
        required=True),
    Key("auth.resume_ttl", float, 7 * 86400.0, "Lifetime of a resume token in "
        "seconds.", minimum=1),
    Key("session.login_timeout", float, 30.0, "A connection that has not "
        "logged in (login, auth or resume) by then is closed.", minimum=0.01),
    Key("session.rate", float, 50.0, "Requests per second one session may "
        "send on average (token bucket); more are answered rate_limited.",
        minimum=0.001),
    Key("session.burst", int, 100, "Requests one session may send at once "
        "above session.rate.", minimum=1),
    Key("session.rate_strikes", int, 100, "Strikes at which a session is "
        "closed: each rate_limited answer adds one, and one fades each "
        "second.", minimum=1),
    Key("session.max_depth", int, 32, "Deepest JSON nesting accepted in a "
        "client envelope; deeper is bad_json.", minimum=2),
    Key("session.max_frame", int, 65536, "Largest client payload in bytes.",
        minimum=16),
    Key("session.heartbeat_ttl", float, 60.0, "A session silent this long is "
        "closed; the gate pings it at half the time.", minimum=0.01),
    Key("session.max_inflight", int, 64, "Requests one session may have "
        "queued or running; more are answered busy.", minimum=1),
    Key("session.max_outbuf", int, 1048576, "Bytes that may wait for a "
        "client that reads slowly (beyond the socket buffer); past them it is "
        "kicked with slow_consumer, and reading from it pauses meanwhile.",
        minimum=1024),
    Key("player.idle_timeout", float, 1800.0, "A player without a session this "
        "long is removed with its mailbox.", minimum=0.01),
    Key("player.mailbox_max", int, 1000, "Persistent pushes kept per player.",
        minimum=1),
    Key("store.kind", str, "memory", "Where players and mailboxes live: "
        "'memory' (this process) or 'redis' (shared by gates).",
        choices=("memory", "redis")),
    Key("store.redis_url", str, "redis://127.0.0.1:6379/0", "Redis for "
        "store.kind = redis."),
    Key("store.redis_prefix", str, "mmogate:", "Prefix of every Redis key "
        "and channel, so several clusters can share one Redis."),
    Key("store.postgres_dsn", str, "", "PostgreSQL (libpq DSN) for the "
        "durable mailbox and the session audit log ('' for none)."),
    Key("store.retry_max", float, 30.0, "Longest backoff between attempts "
        "to reconnect to Redis or PostgreSQL.", minimum=0.01),
    Key("store.timeout", float, 5.0, "Seconds a Redis command may take; "
        "past it the connection is dropped and the store counts as "
        "unreachable until it reconnects.", minimum=0.01),
    Key("store.gate_ttl", float, 10.0, "Seconds a gate counts as alive in "
        "Redis after its last heartbeat (sent every third of it): pushes to "
        "players of a gate silent this long are queued, not delivered.",
        minimum=0.1),
    Key("store.audit_max", int, 10000, "Session audit events kept in memory: "
        "the whole log without store.postgres_dsn, those waiting for "
        "PostgreSQL with it (the oldest are dropped beyond it).", minimum=1),
    Key("store.audit_retention", float, 2592000.0, "Seconds the audit log "
        "keeps an event in PostgreSQL (0: for ever).", minimum=0),
    Key("drain.jitter", float, 10.0, "Seconds over which reconnects sent "
        "by /v1/reconnect and /v1/drain are spread.", minimum=0),
    Key("drain.deadline", float, 300.0, "Default deadline of /v1/drain, in "
        "seconds.", minimum=0),
    Key("drain.close_after", float, 30.0, "Seconds a session told to "
        "reconnect may stay before it is closed.", minimum=0),
    Key("workers.min", int, 8, "Workers kept even when idle.", minimum=0),
    Key("workers.max", int, 256, "Most backend calls in flight at once.",
        minimum=1),
    Key("workers.grow_queue", int, 0, "Queue length above which the pool "
        "adds a worker (0: whenever a request would wait; more trades "
        "latency for fewer workers, and lets slow calls hold others up).",
        minimum=0),
    Key("workers.idle_timeout", float, 60.0, "Seconds an idle worker above "
        "workers.min lives.", minimum=0.001),
    Key("workers.max_queue", int, 10000, "Requests waiting for a worker; more "
        "are answered busy.", minimum=1),
    Key("shutdown.grace", float, 10.0, "Seconds a stopping gate waits for "
        "backend calls and lifecycle events to finish.", minimum=0),
    Key("log.json_file", str, "", "Also write structured JSON log lines here "
        "('-' for standard output, '' for none)."),
)

KEYS = {key.name: key for key in SCHEMA}


def _flatten(table, prefix=""):
    for name, value in table.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _coerce(key, value):
    if key.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key.name}: expected a number, got {value!r}")
        value = float(value)
    elif key.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key.name}: expected an integer, got {value!r}")
    elif key.type is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key.name}: expected true or false, got {value!r}")
    elif key.type is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key.name}: expected a string, got {value!r}")
    elif key.type is list:
        kind = "strings" if key.item is str else "integers"
        if not isinstance(value, list) or not all(
                isinstance(v, key.item) and not isinstance(v, bool)
                for v in value):
            raise ConfigError(f"{key.name}: expected a list of {kind}, "
                              f"got {value!r}")
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{key.name}: must be at least {key.minimum}, got {value!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{key.name}: must be one of {', '.join(key.choices)}, "
                          f"got {value!r}")
    return value


class Config:
    """
    A checked, read-only set of configuration values, read as
    C{config["session.max_frame"]}.
    """

    def __init__(self, values):
        self._values = dict(values)

    def __getitem__(self, name):
        return self._values[name]

    def replace(self, **changes):
        """
        A copy with some values changed, checked like a file's; keys are given
        with C{__} for C{.} (C{session__max_frame=10}).
        """
        values = dict(self._values)
        for name, value in changes.items():
            dotted = name.replace("__", ".")
            if dotted not in KEYS:
                raise ConfigError(f"{dotted}: unknown configuration key")
            values[dotted] = _coerce(KEYS[dotted], value)
        return Config(values)

    def as_dict(self):
        return dict(self._values)


def _check_endpoint(name, description):
    """
    Parse a server endpoint string without listening, so that a typo stops
    start-up naming its key (TLS endpoints also load their files here).
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise ConfigError(f"{name}: not a usable endpoint {description!r}: "
                          f"{e}")


def from_mapping(table, *, from_file=True):
    """
    Check a (possibly nested) mapping of settings and fill in defaults.

    @param from_file: whether the mapping came from an operator's file, in
        which case the keys marked required must be present; the built-in
        development defaults generate an API key and auth secret instead.
    """
    values = {}
    for name, value in _flatten(table):
        key = KEYS.get(name)
        if key is None:
            raise ConfigError(f"{name}: unknown configuration key")
        values[name] = _coerce(key, value)
    for key in SCHEMA:
        if key.name in values:
            continue
        if key.required and from_file:
            raise ConfigError(f"{key.name}: required key is missing")
        values[key.name] = key.default
    if not values["gate.id"]:
        values["gate.id"] = _gate_id()
    if not from_file:
        if not values["api.key"]:
            values["api.key"] = DEV_API_KEY
        if not values["auth.secret"]:
            values["auth.secret"] = secrets.token_hex(32)
    for name in ("api.key", "auth.secret"):
        if not values[name]:
            raise ConfigError(f"{name}: must not be empty")
    if len(values["auth.secret"].encode("utf-8")) < MIN_SECRET:
        # RFC 7518 3.2: an HS256 key shorter than the hash is guessable.
        raise ConfigError(f"auth.secret: must be at least {MIN_SECRET} bytes "
                          f"(HS256 needs a key as long as its hash)")
    if values["workers.max"] < values["workers.min"]:
        raise ConfigError("workers.max: must be at least workers.min")
    if not values["listen.api"]:
        raise ConfigError("listen.api: the push API listener cannot be disabled")
    if values["backend.url"]:
        _check_url("backend.url", values["backend.url"])
    if values["backend.url"] and values["backend.urls"]:
        raise ConfigError("backend.urls: set either backend.url or "
                          "backend.urls, not both")
    for url in values["backend.urls"]:
        _check_url("backend.urls", url)
    weights = values["backend.weights"]
    if weights:
        if len(weights) != len(values["backend.urls"]):
            raise ConfigError("backend.weights: needs one weight per "
                              "backend.urls entry")
        if any(w < 0 for w in weights) or not any(weights):
            raise ConfigError("backend.weights: must be >= 0 and not all 0")
    if values["store.kind"] == "redis":
        _check_url("store.redis_url", values["store.redis_url"],
                   ("redis", "rediss", "unix"))
    for name in ("listen.tcp", "listen.ws", "listen.tcp_secure", "listen.api",
                 "listen.metrics"):
        if values[name]:
            _check_endpoint(name, values[name])
    return Config(values)


def _check_url(name, url, schemes=("http", "https")):
    parts = urlsplit(url)
    try:
        parts.port
    except ValueError as e:
        raise ConfigError(f"{name}: {e} in {url!r}")
    if parts.scheme not in schemes or not (parts.hostname or
                                           parts.scheme == "unix"):
        raise ConfigError(f"{name}: must be a {' or '.join(s + '://' for s in schemes)} "
                          f"URL with a host, got {url!r}")


#: Shortest auth.secret accepted, in bytes.
MIN_SECRET = 32

#: The API key of a gate started without a config file: such a gate listens on
#: loopback only, and a known key lets the README's curl walk-through work.
DEV_API_KEY = "dev-api-key"


def load(path=None):
    """
    Read the TOML file at C{path}, or the development defaults when C{None}.

    @raise ConfigError: naming the offending key, or the file's problem.
    """
    if path is None:
        return from_mapping({}, from_file=False)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{os.path.basename(path)}: not UTF-8: {e}")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{os.path.basename(path)}: not valid TOML: {e}")
    return from_mapping(table, from_file=True)
