"""Ctrl-C between the parts of a step: deferred until the step is whole.

A step that updates its tensors one Python call at a time (the NumPy and Numba
backends, and the commit of the checked path) could be cut by a
KeyboardInterrupt after some tensors moved and others did not.  Inside
``deferred()`` a SIGINT is recorded instead; when the block ends the previous
handler is restored and the signal raised again, so it takes effect (a
KeyboardInterrupt, or whatever the program installed) right after the step,
never inside it.  The compiled fast path needs none of this: it runs no Python
code between its parts.
"""
import os
import signal
import threading
from _thread import get_ident

try:  # signal's own functions, without the enum conversions of signal.py (a few us a step)
    import _signal as _raw
except ImportError:  # not CPython
    _raw = signal


_main_ident = threading.main_thread().ident  # kept at hand: a step asks every time


def _after_fork_in_child():  # the thread that forked is the child's main thread
    global _main_ident
    _main_ident = get_ident()


os.register_at_fork(after_in_child=_after_fork_in_child)


class deferred:
    """``with deferred():`` the block, with a SIGINT in it held until it ends.

    A class rather than a generator-based context manager: a step enters it
    every time, and a generator's machinery costs more than the signal calls."""

    __slots__ = ("_previous", "_received")

    def _record(self, signum, frame):
        self._received = True

    def __enter__(self):
        # Python runs signal handlers in the main thread only; elsewhere there is
        # nothing to defer (and signal.signal would refuse).  A handler Python did
        # not install (None) could not be restored: it is left alone.
        self._previous = None
        if get_ident() == _main_ident:
            previous = _raw.getsignal(signal.SIGINT)
            if previous is not None:
                self._received = False
                _raw.signal(signal.SIGINT, self._record)
                self._previous = previous
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            _raw.signal(signal.SIGINT, self._previous)
            if self._received:
                signal.raise_signal(signal.SIGINT)
        return False
