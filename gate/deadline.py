"""
A deadline on each HTTP request to the API and metrics listeners
(C{api.request_timeout}).

twisted.web's idle timeout starts again with every byte received, so a
client that sends its request a byte at a time (slowloris) keeps the
connection, and what it has buffered, for as long as it likes. Here a
request must arrive whole (request line, headers and body) within
C{api.request_timeout} seconds of its first byte; a connection that misses
it is dropped without an answer. Keep-alive connections idle between
requests are left to twisted.web's idle timeout (60 s), which backends'
connection pools expect.

Tests: C{tests/test_deadline.py}, C{tests/test_e2e_hostile.py}.
"""

from twisted.web.http import HTTPChannel


class DeadlineChannel(HTTPChannel):
    """
    An L{HTTPChannel} that drops a connection whose request does not arrive
    whole in time: its site's C{request_timeout} seconds (C{None} or 0: no
    deadline).
    """

    _deadline = None

    def dataReceived(self, data):
        # While a request is handled, more bytes are only buffered; they
        # come back through here when it is done.
        if data and self._deadline is None and not self._handlingRequest:
            timeout = getattr(self.site, "request_timeout", None)
            if timeout:
                self._deadline = self.callLater(timeout, self._too_slow,
                                                timeout)
        HTTPChannel.dataReceived(self, data)

    def allContentReceived(self):
        self._cancel_deadline()
        HTTPChannel.allContentReceived(self)

    def _too_slow(self, timeout):
        self._deadline = None
        self._log.info("HTTP request from {peer} not received whole within "
                       "{timeout:g} s: closing", peer=str(
                           self.transport.getPeer()), timeout=timeout)
        self.transport.abortConnection()

    def _cancel_deadline(self):
        call, self._deadline = self._deadline, None
        if call is not None and call.active():
            call.cancel()

    def connectionLost(self, reason):
        self._cancel_deadline()
        HTTPChannel.connectionLost(self, reason)
