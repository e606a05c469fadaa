"""One way to patch a model for the duration of a block: `swapped((owner, name, value), ...)` sets each
attribute and restores exactly what was there, whatever raised. Processors, parameter flags, the
checkpointing switch and fast decode paths all go through it; callers say only what they swap."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

Swap = tuple[object, str, object]  # (owner, attribute name, value for the block)


def _own(owner: object, name: str) -> bool:
    """Whether `owner` holds the attribute itself (in its __dict__, through a data descriptor such as a
    tensor's `requires_grad`, or through `__getattr__`: a module's parameters and submodules), rather
    than taking it from its class (a method), or lacking it."""
    if name in getattr(owner, "__dict__", {}):
        return True
    if hasattr(type(owner), name):
        return hasattr(getattr(type(owner), name), "__set__")
    return hasattr(owner, name)


@contextmanager
def swapped(swaps: Iterable[Swap]) -> Iterator[None]:
    """Set each swap for the block; on the way out, put back the attributes the owners had and remove the
    ones they took from their classes, in reverse order."""
    restore: list[tuple[object, str, bool, object]] = []
    try:
        for owner, name, value in swaps:
            own = _own(owner, name)
            restore.append((owner, name, own, getattr(owner, name) if own else None))
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, own, old in reversed(restore):
            if own:
                setattr(owner, name, old)
            else:
                delattr(owner, name)
