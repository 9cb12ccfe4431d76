"""An optimizer in a process made by ``os.fork()``.

A fork copies the memory of every thread but runs only the forking one.  If
another thread was inside an optimizer's ``step`` (or held its lock for a
``load_state_dict``, ``save``, ...), the child's copy of that lock stays held
forever and its parameters and state may be half-updated.  So in the child each
such optimizer's lock is replaced by ``ForkedMidCall``, which refuses every later
call with a message instead of waiting; every other optimizer keeps working
(its steps run on the calling thread there: see ``_kernel``).
"""
import os
import weakref

_OPTIMIZERS = weakref.WeakSet()


def register(optimizer):
    """Watch ``optimizer`` (its ``_lock`` and ``_plan``) across forks."""
    _OPTIMIZERS.add(optimizer)


class ForkedMidCall:
    """The lock of an optimizer that another thread was using when the process forked."""

    message = ("this process was forked while another thread was inside a call of this "
               "optimizer (a step, a load or a save): its parameters and state may be "
               "half-updated here, and that call will never finish; create the optimizer "
               "anew in the child process (and load a checkpoint if needed)")

    def acquire(self, *args, **kwargs):
        raise RuntimeError(self.message)

    __enter__ = acquire

    def release(self):
        raise RuntimeError(self.message)

    def __exit__(self, *exc):
        return False


def _held(lock):
    if lock.acquire(False):
        lock.release()
        return False
    return True


def _after_fork_in_child():
    for optimizer in list(_OPTIMIZERS):
        lock = getattr(optimizer, "_lock", None)
        if lock is not None and not isinstance(lock, ForkedMidCall) and _held(lock):
            optimizer._lock = ForkedMidCall()
            optimizer._plan = None  # every call then goes through the lock


os.register_at_fork(after_in_child=_after_fork_in_child)
