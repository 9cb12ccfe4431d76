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
import contextlib
import signal
import threading

try:  # signal's own functions, without the enum conversions of signal.py (a few us a step)
    import _signal as _raw
except ImportError:  # not CPython
    _raw = signal


@contextlib.contextmanager
def deferred():
    # Python runs signal handlers in the main thread only; elsewhere there is
    # nothing to defer (and signal.signal would refuse).
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = _raw.getsignal(signal.SIGINT)
    if previous is None:  # a handler Python did not install: it could not be restored
        yield
        return
    _raw.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        _raw.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)
