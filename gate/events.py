"""
Lifecycle events to the backend (C{online}, C{offline}, C{expired}),
delivered at least once.

Events wait in a bounded queue and are sent a few at a time, one at a time
per player so that a player's events arrive in order. A failed one goes
back to the front and sending pauses with exponential backoff, so a
backend that is away for a while gets every event (up to
C{backend.events_max}, beyond which the oldest are dropped and counted)
once it returns. An event the backend refuses for good (a 4xx other than
408 and 429) is dropped and logged rather than retried forever.
"""

import random
from collections import deque

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from gate.backend import BackendStatusError


class EventSender:
    """
    @param backend: an L{IBackendClient}.
    @param clock: an L{IReactorTime}.
    """

    log = Logger()
    concurrency = 16
    #: How far down the queue to look for a player with nothing in flight.
    scan = 256
    first_retry = 0.5

    def __init__(self, clock, backend, gate_id, max_backlog, retry_max,
                 metrics=None, random=random.random):
        self._clock = clock
        self._backend = backend
        self._gate_id = gate_id
        self._max_backlog = max_backlog
        self._retry_max = retry_max
        self._metrics = metrics
        self._random = random
        self._queue = deque()
        self._busy = set()
        self._in_flight = 0
        self._delay = 0.0
        self._retry_call = None
        self._waiters = []
        self.dropped = 0

    @property
    def pending(self):
        return len(self._queue) + self._in_flight

    def emit(self, event, player_id, session_id):
        body = {"event": event, "player_id": player_id,
                "gate_id": self._gate_id, "session_id": session_id,
                "ts": self._clock.seconds()}
        if len(self._queue) >= self._max_backlog:
            self._queue.popleft()
            self.dropped += 1
            if self._metrics is not None:
                self._metrics.event("dropped")
            self.log.warn("lifecycle event backlog full "
                          "({max} events): oldest dropped",
                          max=self._max_backlog)
        self._queue.append(body)
        self._pump()

    def _pump(self):
        queue = self._queue
        busy = self._busy
        i = 0
        # Events of one player go one at a time, in order; others pass them.
        # The scan is bounded: a long run of one busy player just waits.
        while (i < len(queue) and i < self.scan
               and self._in_flight < self.concurrency
               and self._retry_call is None):
            body = queue[i]
            player_id = body["player_id"]
            if player_id in busy:
                i += 1
                continue
            del queue[i]
            busy.add(player_id)
            self._in_flight += 1
            d = self._backend.event(body)
            d.addCallbacks(self._sent, self._failed, callbackArgs=(body,),
                           errbackArgs=(body,))

    def _sent(self, _, body):
        self._in_flight -= 1
        self._busy.discard(body["player_id"])
        self._delay = 0.0
        if self._metrics is not None:
            self._metrics.event("sent")
        self._pump()
        self._check_idle()

    def _failed(self, failure, body):
        self._in_flight -= 1
        self._busy.discard(body["player_id"])
        if failure.check(BackendStatusError) and not failure.value.retryable:
            # The backend refuses this event for good (a 4xx): retrying
            # would hold up every event behind it forever.
            if self._metrics is not None:
                self._metrics.event("rejected")
            self.log.error("backend rejected lifecycle event {event} for "
                           "{player_id}: {why}; dropped", event=body["event"],
                           player_id=body["player_id"],
                           why=failure.getErrorMessage())
            self._pump()
            self._check_idle()
            return
        # Back in front: it was the oldest pending event of its player.
        self._queue.appendleft(body)
        if self._metrics is not None:
            self._metrics.event("retried")
        if self._retry_call is None:
            self._delay = min(self._retry_max,
                              max(self.first_retry, self._delay * 2))
            delay = self._delay * (0.5 + self._random() / 2)
            self.log.warn("lifecycle event {event} for {player_id} not "
                          "delivered ({why}); retrying in {delay:.1f}s",
                          event=body["event"], player_id=body["player_id"],
                          why=failure.getErrorMessage(), delay=delay)
            self._retry_call = self._clock.callLater(delay, self._retry)

    def _retry(self):
        self._retry_call = None
        self._pump()

    def _check_idle(self):
        if not self._queue and not self._in_flight and self._waiters:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def flush(self):
        """
        @return: L{Deferred} firing once every queued event was delivered; a
            pending retry is brought forward. The caller bounds the wait.
        """
        if not self._queue and not self._in_flight:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        if self._retry_call is not None:
            self._retry_call.cancel()
            self._retry_call = None
            self._pump()
            self._check_idle()
        return d

    def stop(self):
        """
        Stop retrying; what is still queued is logged as lost.
        """
        if self._retry_call is not None:
            self._retry_call.cancel()
            self._retry_call = None
        if self._queue:
            self.log.warn("{n} lifecycle events not delivered at shutdown",
                          n=len(self._queue))
