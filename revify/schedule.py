"""Move a converted model's coupling from faithful to stable during fine-tuning.

Right after conversion with a small ``beta`` and ``alpha = 1 - beta`` the network computes nearly
the pretrained function (``x_{k+1} = x_k + R_k(x_k) + beta * (x_{k-1} - x_k)``). A
:class:`Schedule` called once per training step moves every stage towards the RevNet coupling
``alpha=0, beta=1``, as Dr2Net does, so that the end of fine-tuning uses the coupling whose float
gradients are as accurate as plain autograd's.
"""

from __future__ import annotations

from torch import nn

from .convert import stages

__all__ = ["Schedule"]


class Schedule:
    """Linear ``alpha`` and geometric ``beta`` schedule over ``steps`` calls of :meth:`step`.

    Args:
        model: a converted model.
        steps: number of :meth:`step` calls over which to move from ``start`` to ``end``.
        start, end: ``(alpha, beta)`` pairs. Default: from the coefficients the model was
            converted with (the faithful ``(63/64, 1/64)``, say) to ``(0, 1)``.
        warmup: steps to hold ``start`` before moving.

    With exact streams ``beta`` must stay ``1/d`` for an integer ``d``: the schedule moves
    ``d`` geometrically from ``1/beta_start`` to ``1/beta_end`` and rounds it.

    Example::

        model = revify.convert(model, alpha=63 / 64, beta=1 / 64, exact=True)
        schedule = revify.Schedule(model, steps=len(loader) * epochs // 2)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            optimizer.step(); optimizer.zero_grad()
            schedule.step()
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int,
        start: tuple[float, float] | None = None,
        end: tuple[float, float] = (0.0, 1.0),
        warmup: int = 0,
    ) -> None:
        if steps < 1:
            raise ValueError(f"revify.Schedule: steps must be >= 1, got {steps}")
        if not stages(model):
            raise ValueError("revify.Schedule: model has no reversible stage; convert it first")
        if start is None:
            first = stages(model)[0]
            start = (first.alpha, first.beta)
        for beta in (start[1], end[1]):
            if not 0 < beta <= 1:
                raise ValueError(f"revify.Schedule: beta must be in (0, 1], got {beta}")
        self.model = model
        self.steps = steps
        self.start = start
        self.end = end
        self.warmup = warmup
        self.count = 0
        self._apply()

    def coefficients(self, count: int | None = None) -> tuple[float, float]:
        """``(alpha, beta)`` after ``count`` steps (default: now)."""
        count = self.count if count is None else count
        t = min(max(count - self.warmup, 0) / self.steps, 1.0)
        (a0, b0), (a1, b1) = self.start, self.end
        alpha = a0 + (a1 - a0) * t
        beta = b0 ** (1 - t) * b1**t
        return alpha, beta

    def step(self) -> tuple[float, float]:
        """Advance one step and set the new coefficients on every stage."""
        self.count += 1
        return self._apply()

    def _apply(self) -> tuple[float, float]:
        alpha, beta = self.coefficients()
        for st in stages(self.model):
            st.alpha = alpha
            st.beta = 1.0 / round(1.0 / beta) if st.exact else beta
        return alpha, beta
