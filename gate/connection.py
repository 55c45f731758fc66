"""
What the TCP and WebSocket protocols share: closing a connection that will
not drain, and refusing new ones while the gate is not accepting.
"""

#: Seconds a closing connection may take to write what is queued to it
#: before it is dropped; a client that stopped reading must not keep it.
CLOSE_TIMEOUT = 10.0


class ClosingTimer:
    """
    Aborts a transport that has not closed C{CLOSE_TIMEOUT} seconds after
    it was asked to.
    """

    def __init__(self, clock):
        self._clock = clock
        self._call = None

    def start(self, transport):
        if self._call is None:
            self._call = self._clock.callLater(CLOSE_TIMEOUT,
                                               transport.abortConnection)

    def cancel(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def peer_of(transport):
    address = transport.getPeer()
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
