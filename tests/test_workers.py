"""
Tests for L{gate.workers.WorkerPool}: bounded concurrency that grows under
load, shrinks when idle, refuses work beyond its queue and drains on stop.
"""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gate import errors
from gate.errors import GateError
from gate.metrics import Metrics
from gate.workers import PoolFull, WorkerPool


class Jobs:
    """
    Jobs that wait for the test to finish them, recording which started.
    """

    def __init__(self):
        self.started = []
        self.waiting = {}

    def job(self, name):
        self.started.append(name)
        d = self.waiting[name] = Deferred()
        return d

    def finish(self, name, result=None):
        self.waiting.pop(name).callback(result)

    def fail(self, name, exception):
        self.waiting.pop(name).errback(exception)


class WorkerPoolTests(SynchronousTestCase):
    def pool(self, minimum=1, maximum=3, grow_queue=1, idle_timeout=10,
             max_queue=5, metrics=None):
        self.clock = Clock()
        self.jobs = Jobs()
        return WorkerPool(self.clock, minimum, maximum, grow_queue,
                          idle_timeout, max_queue, metrics)

    def submit(self, pool, *names):
        return [pool.submit(self.jobs.job, name) for name in names]

    def test_minimum_at_start(self):
        pool = self.pool(minimum=2)
        self.assertEqual((pool.size, pool.busy, pool.queued), (2, 0, 0))

    def test_result(self):
        pool = self.pool()
        (d,) = self.submit(pool, "a")
        self.assertNoResult(d)
        self.jobs.finish("a", 42)
        self.assertEqual(self.successResultOf(d), 42)
        self.assertEqual((pool.busy, pool.size), (0, 1))

    def test_args_and_sync_jobs(self):
        pool = self.pool()
        self.assertEqual(self.successResultOf(
            pool.submit(lambda a, b: a + b, 2, 3)), 5)
        self.assertEqual(self.successResultOf(
            pool.submit(lambda: succeed("x"))), "x")

    def test_failures_propagate(self):
        """
        A job's failure (raised or returned) reaches the submitter, and the
        worker goes on serving.
        """
        pool = self.pool(minimum=1, maximum=1)
        d1, d2 = self.submit(pool, "a", "b")
        self.jobs.fail("a", GateError(errors.BACKEND_ERROR, "boom"))
        self.assertEqual(self.failureResultOf(d1, GateError).value.code,
                         errors.BACKEND_ERROR)
        self.assertEqual(self.jobs.started, ["a", "b"])
        self.jobs.finish("b", 1)
        self.assertEqual(self.successResultOf(d2), 1)

        def boom():
            raise ValueError("sync")

        self.failureResultOf(pool.submit(boom), ValueError)
        self.failureResultOf(pool.submit(lambda: fail(KeyError("k"))), KeyError)
        self.assertEqual((pool.busy, pool.size, pool.queued), (0, 1, 0))

    def test_queue_until_grow_queue(self):
        """
        With every worker busy, jobs wait while no more than C{grow_queue}
        are queued.
        """
        pool = self.pool(minimum=1, maximum=3, grow_queue=2)
        self.submit(pool, "a", "b", "c")
        self.assertEqual(self.jobs.started, ["a"])
        self.assertEqual((pool.size, pool.busy, pool.queued), (1, 1, 2))

    def test_grows_above_grow_queue(self):
        pool = self.pool(minimum=1, maximum=3, grow_queue=2)
        self.submit(pool, "a", "b", "c", "d")
        self.assertEqual(self.jobs.started, ["a", "b"])
        self.assertEqual((pool.size, pool.busy, pool.queued), (2, 2, 2))

    def test_never_above_max(self):
        pool = self.pool(minimum=1, maximum=3, grow_queue=0, max_queue=100)
        self.submit(pool, *"abcdefghij")
        self.assertEqual(self.jobs.started, ["a", "b", "c"])
        self.assertEqual((pool.size, pool.busy, pool.queued), (3, 3, 7))

    def test_queued_run_in_order(self):
        pool = self.pool(minimum=1, maximum=1, max_queue=100)
        ds = self.submit(pool, "a", "b", "c", "d")
        for name in "abcd":
            self.assertEqual(self.jobs.started[-1], name)
            self.jobs.finish(name, name)
        self.assertEqual([self.successResultOf(d) for d in ds], list("abcd"))

    def test_min_zero_runs_a_job(self):
        """
        A pool allowed to shrink to no workers (C{workers.min = 0}) still
        starts a worker for a job that arrives when it has none: a lone
        request must not wait for C{grow_queue} others.
        """
        pool = self.pool(minimum=0, maximum=4, grow_queue=16)
        self.assertEqual(pool.size, 0)
        (d,) = self.submit(pool, "a")
        self.assertEqual(self.jobs.started, ["a"])
        self.jobs.finish("a", "done")
        self.assertEqual(self.successResultOf(d), "done")

    def test_min_zero_after_reaping(self):
        """
        After idle reaping took a C{min = 0} pool to no workers, new work
        still runs.
        """
        pool = self.pool(minimum=0, maximum=4, grow_queue=0)
        self.submit(pool, "a")
        self.assertEqual(self.jobs.started, ["a"])
        self.jobs.finish("a")
        self.clock.advance(10)
        self.assertEqual(pool.size, 0)
        (d,) = self.submit(pool, "b")
        self.assertEqual(self.jobs.started, ["a", "b"])

    def test_busy_when_queue_full(self):
        """
        Once C{max_queue} jobs wait, more are refused with C{busy}.
        """
        pool = self.pool(minimum=1, maximum=1, max_queue=2)
        self.submit(pool, "a", "b", "c")
        self.assertEqual(pool.queued, 2)
        e = self.assertRaises(PoolFull, pool.submit, self.jobs.job, "d")
        self.assertEqual(e.code, errors.BUSY)
        self.assertIsInstance(e, GateError)
        self.assertNotIn("d", self.jobs.started)
        self.jobs.finish("a")
        pool.submit(self.jobs.job, "d")
        self.assertEqual(pool.queued, 2)

    def test_idle_workers_reaped_to_minimum(self):
        pool = self.pool(minimum=1, maximum=3, grow_queue=0, idle_timeout=10)
        self.submit(pool, "a", "b", "c")
        self.assertEqual(pool.size, 3)
        self.jobs.finish("a")
        self.clock.advance(5)
        self.jobs.finish("b")
        self.jobs.finish("c")
        self.assertEqual((pool.size, pool.busy), (3, 0))
        self.clock.advance(5)
        self.assertEqual(pool.size, 2)
        self.clock.advance(4.9)
        self.assertEqual(pool.size, 2)
        self.clock.advance(0.1)
        self.assertEqual(pool.size, 1)
        self.clock.advance(1000)
        self.assertEqual(pool.size, 1)

    def test_reaping_waits_for_idle_period(self):
        """
        A worker reused before its idle timeout is not reaped.
        """
        pool = self.pool(minimum=0, maximum=2, grow_queue=0, idle_timeout=10)
        self.submit(pool, "a")
        self.jobs.finish("a")
        self.clock.advance(9)
        self.submit(pool, "b")
        self.clock.advance(5)
        self.assertEqual((pool.size, pool.busy), (1, 1))
        self.jobs.finish("b")
        self.clock.advance(9.9)
        self.assertEqual(pool.size, 1)
        self.clock.advance(0.1)
        self.assertEqual(pool.size, 0)

    def test_minimum_kept(self):
        pool = self.pool(minimum=2, maximum=4)
        self.clock.advance(100)
        self.assertEqual(pool.size, 2)
        # Each kept worker looks again after another idle period.
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.submit(pool, "a", "b")
        self.assertEqual(self.jobs.started, ["a", "b"])
        self.assertEqual(pool.size, 2)


    def test_stop_waits_for_running_and_queued(self):
        pool = self.pool(minimum=1, maximum=1, max_queue=10)
        d1, d2 = self.submit(pool, "a", "b")
        stopped = pool.stop()
        self.assertNoResult(stopped)
        self.assertRaises(PoolFull, pool.submit, self.jobs.job, "c")
        self.jobs.finish("a")
        self.assertNoResult(stopped)
        self.assertEqual(self.jobs.started, ["a", "b"])
        self.jobs.finish("b")
        self.assertIsNone(self.successResultOf(stopped))
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(pool.size, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_idle(self):
        pool = self.pool(minimum=3)
        self.assertIsNone(self.successResultOf(pool.stop()))
        self.assertEqual(pool.size, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(PoolFull, pool.submit, lambda: None)

    def test_stop_after_failure(self):
        pool = self.pool()
        (d,) = self.submit(pool, "a")
        stopped = pool.stop()
        self.jobs.fail("a", ValueError("x"))
        self.failureResultOf(d, ValueError)
        self.successResultOf(stopped)

    def test_metrics(self):
        metrics = Metrics("g")
        pool = self.pool(minimum=1, maximum=2, grow_queue=0, metrics=metrics)

        def value(name):
            return metrics.registry.get_sample_value(name)

        self.assertEqual(value("mmogate_workers"), 1)
        self.submit(pool, "a", "b", "c")
        self.assertEqual((value("mmogate_workers"), value("mmogate_workers_busy"),
                          value("mmogate_worker_queue")), (2, 2, 1))
        self.jobs.finish("a")
        self.jobs.finish("b")
        self.jobs.finish("c")
        self.assertEqual((value("mmogate_workers_busy"),
                          value("mmogate_worker_queue")), (0, 0))
