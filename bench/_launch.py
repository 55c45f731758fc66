"""
Exec a command so that it dies with the benchmark: C{python -m bench._launch
CMD ARGS...}.

Sets the parent-death signal (Linux C{prctl(PR_SET_PDEATHSIG, SIGKILL)}),
which survives C{execve}, then replaces itself with C{CMD}. However the
benchmark process ends - normally, by an exception, or killed - the backend,
the gate and the load processes it started cannot outlive it.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv):
    if not argv:
        raise SystemExit("usage: python -m bench._launch CMD [ARGS...]")
    expected_parent = int(os.environ.pop("MMOGATE_BENCH_PARENT", "0"))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the benchmark still kills its children on exit
    # The parent may have died between fork and prctl: then nobody would
    # send the signal.
    if expected_parent and os.getppid() != expected_parent:
        raise SystemExit(1)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
