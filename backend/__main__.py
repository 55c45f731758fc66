"""
Run the reference backend standalone: C{python -m backend} or
C{mmogate-backend}.

    python -m backend --listen tcp:8000:interface=127.0.0.1 \\
        --api-url http://127.0.0.1:8090 --api-key KEY [--secret S]

Secrets may come from the environment instead (C{MMOGATE_API_KEY},
C{MMOGATE_BACKEND_SECRET}) so they do not show in the process list.

Tests: L{tests.test_backend_reference}.
"""

import argparse
import os
import sys

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.server import Site

from backend.reference import ReferenceBackend

log = Logger(namespace="backend")


def parse_args(argv=None, environ=None):
    """
    The options of L{main}; exits with a usage message on bad ones.
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="mmogate-backend",
        description="The mmogate reference game backend (PROTOCOL.md section 4).",
    )
    parser.add_argument(
        "--listen",
        default="tcp:8000:interface=127.0.0.1",
        help="Twisted server endpoint to serve on (default: %(default)s)",
    )
    parser.add_argument(
        "--api-url",
        default=None,
        help="a gate's push API, used when the recipient's gate is not known "
        "from /gates and /events (default: gates that registered)",
    )
    parser.add_argument(
        "--api-key",
        default=environ.get("MMOGATE_API_KEY"),
        help="the gates' api.key (default: $MMOGATE_API_KEY)",
    )
    parser.add_argument(
        "--secret",
        default=environ.get("MMOGATE_BACKEND_SECRET"),
        help="backend.secret: require signed requests (default: "
        "$MMOGATE_BACKEND_SECRET, else none)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log every HTTP request",
    )
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("--api-key (or $MMOGATE_API_KEY) is required")
    return args


def serve(reactor, args):
    """
    Start serving: a L{Deferred} that fires with C{(backend, port)} once
    listening. Stopping the reactor stops the port and closes the backend.
    """
    backend = ReferenceBackend(
        reactor, api_key=args.api_key, secret=args.secret, api_url=args.api_url
    )
    site = Site(backend.resource())
    if not args.access_log:
        site.log = lambda request: None
    d = serverFromString(reactor, args.listen).listen(site)

    def listening(port):
        log.info(
            "reference backend on {address} (signatures {signed})",
            address=port.getHost(),
            signed="required" if args.secret else "off",
        )
        reactor.addSystemEventTrigger("before", "shutdown", backend.close)
        return backend, port

    return d.addCallback(listening)


def _run(reactor, args):
    def failed(failure):
        log.error(
            "cannot serve on {listen}: {why}",
            listen=args.listen,
            why=failure.getErrorMessage(),
        )
        raise SystemExit(1)

    # Serving never fires: react() returns when the reactor stops (e.g. ^C).
    return maybeDeferred(serve, reactor, args).addCallbacks(
        lambda _: Deferred(), failed
    )


def main(argv=None):
    """
    Console entry point: parse C{argv}, serve until interrupted.
    """
    from twisted.internet.task import react

    args = parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    react(_run, (args,))


if __name__ == "__main__":
    main()
