"""
Request body signatures between a gate and its backends.

When C{backend.secret} is set, a gate signs every request body it sends to a
backend with HMAC-SHA256 and puts the hex digest in L{SIGNATURE_HEADER}, so a
backend reachable by others can tell the gate's calls from forged ones.

Tests: L{tests.test_backend_reference}.
"""

import hashlib
import hmac

__all__ = ["GATE_HEADER", "SIGNATURE_HEADER", "sign", "verify"]

#: Header naming the gate (C{gate.id}) on every gate-to-backend request.
GATE_HEADER = "X-Mmogate-Gate"

#: Header carrying L{sign}'s hex digest of the raw request body.
SIGNATURE_HEADER = "X-Mmogate-Signature"


def _key(secret):
    if isinstance(secret, str):
        return secret.encode("utf-8")
    if isinstance(secret, (bytes, bytearray)):
        return bytes(secret)
    raise TypeError(f"secret must be str or bytes, not {type(secret).__name__}")


def sign(secret, body):
    """
    The lowercase hex HMAC-SHA256 of C{body} under C{secret}.

    @param secret: the shared secret; C{str} is taken as UTF-8.
    @type secret: L{bytes} or L{str}
    @param body: the exact bytes sent as the request body.
    @type body: L{bytes}
    @rtype: L{str}
    """
    return hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify(secret, body, signature):
    """
    Whether C{signature} is L{sign}C{(secret, body)}, compared in constant time.

    Accepts the digest as C{str} or C{bytes}, in either letter case; a missing
    (C{None}) or malformed signature is simply C{False}, never an exception,
    because it comes straight from a request header.

    @rtype: L{bool}
    """
    if signature is None:
        return False
    if isinstance(signature, str):
        try:
            signature = signature.encode("ascii")
        except UnicodeEncodeError:
            return False
    elif not isinstance(signature, (bytes, bytearray)):
        return False
    expected = sign(secret, body).encode("ascii")
    return hmac.compare_digest(expected, bytes(signature).strip().lower())
