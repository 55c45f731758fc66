"""
Registration with the backend (C{POST /gates}): at start, every
C{backend.register_interval} seconds, on drain and on stop.

A registration never holds up service: failures are logged and the next
interval tries again.
"""

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class Registrar(Service):
    """
    @param backend: an L{IBackendClient}.
    @param describe: returns C{(api_url, listen)} once the listeners are
        bound.
    """

    log = Logger()

    def __init__(self, clock, backend, gate_id, interval, describe):
        self._clock = clock
        self._backend = backend
        self._gate_id = gate_id
        self._interval = interval
        self._describe = describe
        self.state = "up"
        self._loop = None

    def startService(self):
        Service.startService(self)
        if self._interval > 0:
            self._loop = LoopingCall(self.announce)
            self._loop.clock = self._clock
            self._loop.start(self._interval, now=True)
        else:
            self.announce()

    def announce(self, state=None):
        """
        Send one registration; never fails.

        @return: L{Deferred} firing with whether the backend took it.
        """
        if state is not None:
            self.state = state
        api_url, listen = self._describe()
        body = {"gate_id": self._gate_id, "state": self.state,
                "api_url": api_url, "listen": listen}
        d = self._backend.register(body)

        def failed(failure):
            self.log.warn("registration ({state}) with the backend failed: "
                          "{why}", state=body["state"],
                          why=failure.getErrorMessage())
            return False

        return d.addCallbacks(lambda _: True, failed)

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
