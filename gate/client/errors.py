"""
The one exception a client application handles: L{GateError}.

Codes the gate sends are the stable strings of PROTOCOL.md section 2 (or a
backend's own). The few codes below are made by the client itself for
things the gate never gets to say, and share the same shape so that an
application switches on C{code} alone.
"""

#: The connection dropped while a request was in flight. The request may or
#: may not have reached the backend.
CONNECTION_LOST = "connection_lost"
#: A request was made while no connection was bound (before connect() fired,
#: while reconnecting, or after close()); it was not sent.
NOT_CONNECTED = "not_connected"
#: The first connection could not be made, or not bound in time.
CONNECT_FAILED = "connect_failed"
#: The application closed the client.
CLOSED = "closed"
#: The gate ended the session with a kick the client does not recover from.
KICKED = "kicked"
#: The gate sent something that is not an envelope; the connection is
#: dropped (and, when reconnecting is on, made again).
PROTOCOL_ERROR = "protocol_error"


class GateError(Exception):
    """
    A failure with a stable C{code} to switch on and a C{msg} for people.
    """

    def __init__(self, code, msg=""):
        Exception.__init__(self, code, msg)
        self.code = code
        self.msg = msg

    def __str__(self):
        return f"{self.code}: {self.msg}" if self.msg else self.code
