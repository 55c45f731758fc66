"""
Stable error codes of the client protocol (PROTOCOL.md section 2).

Codes are part of the wire contract: clients switch on them, so they live in
one place and are never spelled inline elsewhere.
"""

BAD_JSON = "bad_json"
FRAME_TOO_LARGE = "frame_too_large"
UNKNOWN_TYPE = "unknown_type"
BAD_REQUEST = "bad_request"
NOT_AUTHENTICATED = "not_authenticated"
AUTH_FAILED = "auth_failed"
RESUME_REJECTED = "resume_rejected"
RATE_LIMITED = "rate_limited"
BUSY = "busy"
BACKEND_UNAVAILABLE = "backend_unavailable"
BACKEND_TIMEOUT = "backend_timeout"
BACKEND_ERROR = "backend_error"
ROUTE_NOT_FOUND = "route_not_found"
INTERNAL = "internal"


class GateError(Exception):
    """
    A failure that is answered to the client as an C{err} envelope.

    Raised anywhere below a session; the session turns it into
    C{{"t": "err", "id": ..., "code": ..., "msg": ...}}.
    """

    def __init__(self, code, msg):
        Exception.__init__(self, code, msg)
        self.code = code
        self.msg = msg

    def __repr__(self):
        return f"GateError({self.code!r}, {self.msg!r})"


class ProtocolViolation(GateError):
    """
    Input so broken that the connection is answered once and then closed.
    """
