"""
Gate addresses: C{tcp://host:port}, C{tls://host:port}, C{ws://host:port/ws},
C{wss://host:port/ws}, C{tcp+enc://host:port} (the encrypted channel), and the bare C{host:port} a gate may send in a
C{reconnect} envelope; and the Twisted endpoint that reaches each.
"""

from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)

SCHEMES = ("tcp", "tls", "ws", "wss", "tcp+enc")
_DEFAULT_PORTS = {"ws": 80, "wss": 443}
_PEM_END = b"-----END CERTIFICATE-----"


@dataclass(frozen=True)
class Address:
    """
    Where a gate listens and how to speak to it.

    @ivar scheme: C{tcp} and C{tls} use length-prefixed frames, C{ws} and
        C{wss} WebSocket messages; C{tls} and C{wss} are encrypted.
    @ivar path: the WebSocket request path (with any query); empty for
        the framed schemes.
    """

    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def websocket(self):
        return self.scheme in ("ws", "wss")

    @property
    def secure(self):
        return self.scheme in ("tls", "wss")

    @property
    def encrypted_channel(self):
        """
        Whether this is the gate's own encrypted channel (PROTOCOL.md
        section 8) over plain TCP, rather than TLS.
        """
        return self.scheme == "tcp+enc"

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    def __str__(self):
        return self.url


def parse_address(text, relative_to=None):
    """
    Parse a gate address.

    A bare C{host:port} takes its scheme (and WebSocket path) from
    C{relative_to}, the address in use, because that is what a gate means
    when it sends one in C{reconnect}; with nothing to be relative to it is
    TCP. A WebSocket URL without a path gets C{/ws}.

    @raise ValueError: for anything else.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("an address must be a non-empty string")
    text = text.strip()
    if "://" in text:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"unsupported scheme in {text!r}; "
                             f"use one of {', '.join(SCHEMES)}")
        path = parts.path
        if parts.query:
            path += "?" + parts.query
    else:
        parts = urlsplit("//" + text)
        if parts.path or parts.query or parts.fragment:
            raise ValueError(f"{text!r} is neither host:port nor a URL")
        base = relative_to.scheme if relative_to is not None else "tcp"
        scheme = base
        path = relative_to.path if base in ("ws", "wss") else ""
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {text!r}")
    if scheme in ("ws", "wss"):
        path = path or "/ws"
        if port is None:
            port = _DEFAULT_PORTS[scheme]
    else:
        if path not in ("", "/"):
            raise ValueError(f"{scheme} addresses have no path: {text!r}")
        path = ""
        if port is None:
            raise ValueError(f"{text!r} needs a port")
    return Address(scheme, host, port, path)


def load_trust_root(ca_file):
    """
    A trust root holding every certificate in the PEM file C{ca_file}, for
    pinning a private CA instead of trusting the platform's.
    """
    with open(ca_file, "rb") as f:
        pem = f.read()
    certs = [Certificate.loadPEM(block + _PEM_END)
             for block in pem.split(_PEM_END) if b"BEGIN CERTIFICATE" in block]
    if not certs:
        raise ValueError(f"no PEM certificate in {ca_file}")
    return trustRootFromCertificates(certs)


def endpoint_for(reactor, address, *, trust_root=None, timeout=30.0):
    """
    The client endpoint that reaches C{address}.

    C{HostnameEndpoint} resolves names and races IPv4 against IPv6; for the
    secure schemes TLS is layered on top and verifies the gate's certificate
    for C{address.host}, against C{trust_root} when given (see
    L{load_trust_root}) or the platform's trust store.
    """
    endpoint = HostnameEndpoint(reactor, address.host, address.port,
                                timeout=timeout)
    if address.secure:
        options = optionsForClientTLS(address.host, trustRoot=trust_root)
        endpoint = wrapClientTLS(options, endpoint)
    return endpoint
