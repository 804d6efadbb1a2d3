"""Switches that change how converted models run: ordinary autograd, or the original function."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

__all__ = ["plain_autograd"]

_PLAIN = contextvars.ContextVar("revify_plain_autograd", default=False)
_ORIGINAL = contextvars.ContextVar("revify_original", default=False)
# Name of the plan step (stage or segment) running now; read by the audit to attribute memory.
current_step: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "revify_current_step", default=None
)
# Called as observer(step, outputs) after each plan step's forward; set by the planner's cost
# measurement (_costs.py) to follow the step's backward.
step_observer: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "revify_step_observer", default=None
)


@contextlib.contextmanager
def plain_autograd() -> Iterator[None]:
    """Run converted models with ordinary autograd: same function, activations stored.

    Inside this context every reversible stage evaluates the same coupled recurrence and every
    checkpointed segment the same layers, but autograd records and stores everything as for an
    unconverted model. Use it as the reference when checking revify's gradients, or to debug.

    Example::

        with revify.plain_autograd():
            loss_ref = model(x).sum()   # same outputs, ordinary backward
    """
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


@contextlib.contextmanager
def _original() -> Iterator[None]:
    """Run converted models as they were before ``convert`` (used by the audit's "before")."""
    token = _ORIGINAL.set(True)
    try:
        yield
    finally:
        _ORIGINAL.reset(token)


def is_plain() -> bool:
    return _PLAIN.get()


def is_original() -> bool:
    return _ORIGINAL.get()
