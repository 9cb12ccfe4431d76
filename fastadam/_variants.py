"""A variant of an optimizer class: the same constructor with other defaults.

``AdamW`` is ``Adam`` with decoupled weight decay and ``weight_decay=1e-2``; it
states that as one line, ``__init__ = with_defaults(Adam.__init__,
weight_decay=1e-2)``, instead of repeating the whole signature.  The result's
signature (``help``, ``inspect.signature``) shows the new defaults.
"""
import functools
import inspect


def with_defaults(init, without=(), **defaults):
    """``init`` with the defaults of the named parameters replaced, and the
    parameters named in ``without`` removed (they keep their defaults)."""
    signature = inspect.signature(init)
    unknown = (set(defaults) | set(without)) - set(signature.parameters)
    if unknown:
        raise TypeError(f"{init.__qualname__} has no parameter {', '.join(sorted(unknown))}")
    signature = signature.replace(parameters=[
        p.replace(default=defaults[p.name]) if p.name in defaults else p
        for p in signature.parameters.values() if p.name not in without])

    @functools.wraps(init)
    def __init__(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        init(*bound.args, **bound.kwargs)

    __init__.__signature__ = signature
    return __init__
