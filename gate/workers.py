"""
The worker pool of the seed design: a bounded number of backend calls in
flight, sized between C{workers.min} and C{workers.max}.

In Twisted a worker is not a thread but a slot that runs one asynchronous
job at a time. The pool grows when more than C{workers.grow_queue} jobs wait,
reaps workers idle for C{workers.idle_timeout} down to C{workers.min}, and
refuses work once C{workers.max_queue} jobs wait, so a burst costs bounded
memory and is answered C{busy} instead of queuing forever.
"""

from collections import deque

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gate import errors
from gate.errors import GateError


class PoolFull(GateError):
    def __init__(self):
        GateError.__init__(self, errors.BUSY, "the gate is busy, try again")


class _Worker:
    __slots__ = ("reaper",)

    def __init__(self):
        self.reaper = None


class WorkerPool:
    """
    Runs jobs (callables returning Deferreds) on at most C{maximum} workers.

    @param clock: an L{IReactorTime} for reaping idle workers.
    @param metrics: a L{gate.metrics.Metrics} or C{None}.
    """

    log = Logger()

    def __init__(self, clock, minimum, maximum, grow_queue, idle_timeout,
                 max_queue, metrics=None):
        self._clock = clock
        self.minimum = minimum
        self.maximum = maximum
        self.grow_queue = grow_queue
        self.idle_timeout = idle_timeout
        self.max_queue = max_queue
        self._metrics = metrics
        self._queue = deque()
        self._idle = []
        self.busy = 0
        self._stopping = False
        self._drained = []
        for _ in range(minimum):
            self._park(_Worker())
        self._report()

    @property
    def size(self):
        return len(self._idle) + self.busy

    @property
    def queued(self):
        return len(self._queue)

    def submit(self, job, *args):
        """
        Run C{job(*args)} when a worker is free.

        @return: L{Deferred} with the job's result.
        @raise PoolFull: when C{max_queue} jobs already wait or the pool is
            stopping.
        """
        if self._stopping or len(self._queue) >= self.max_queue:
            raise PoolFull()
        d = Deferred()
        self._queue.append((job, args, d))
        self._dispatch()
        return d

    def _dispatch(self):
        queue = self._queue
        while queue:
            if self._idle:
                worker = self._idle.pop()
                worker.reaper.cancel()
                worker.reaper = None
            elif self.size == 0 or self.size < self.minimum or (
                    len(queue) > self.grow_queue and self.size < self.maximum):
                # With no worker at all (workers.min = 0) one is always
                # started: a job must never wait for a queue to fill.
                worker = _Worker()
            else:
                break
            self._run(worker, *queue.popleft())
        self._report()

    def _run(self, worker, job, args, d):
        self.busy += 1
        result = maybeDeferred(job, *args)

        def done(outcome):
            self.busy -= 1
            if self._queue:
                self._run(worker, *self._queue.popleft())
            elif not self._stopping:
                self._park(worker)
            self._report()
            self._check_drained()
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

        result.addBoth(done)

    def _park(self, worker):
        self._idle.append(worker)
        worker.reaper = self._clock.callLater(self.idle_timeout, self._reap,
                                              worker)

    def _reap(self, worker):
        if self.size > self.minimum:
            self._idle.remove(worker)
            worker.reaper = None
            self._report()
        else:
            # Kept for workers.min; look again after another idle period.
            worker.reaper = self._clock.callLater(self.idle_timeout,
                                                  self._reap, worker)

    def _report(self):
        if self._metrics is not None:
            self._metrics.pool(self.size, self.busy, len(self._queue))

    def _check_drained(self):
        if self.busy == 0 and not self._queue and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def stop(self):
        """
        Refuse new jobs and wait for running and queued ones to finish.

        @return: L{Deferred} that fires when no job is left; the caller
            bounds the wait (C{shutdown.grace}).
        """
        self._stopping = True
        for worker in self._idle:
            worker.reaper.cancel()
        self._idle = []
        self._report()
        if self.busy == 0 and not self._queue:
            return succeed(None)
        d = Deferred()
        self._drained.append(d)
        return d
