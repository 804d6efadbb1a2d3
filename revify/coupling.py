"""The two-stream reversible coupling and the autograd function that runs it.

A reversible stage replaces a chain of identity residual units ``x <- x + R_k(x)`` with

    x_{k+1} = beta * x_{k-1} + alpha * x_k + R_k(x_k),      x_{-1} = x_0 = stage input,

which keeps every pretrained unit at full width (DESIGN.md §2). ``alpha=0, beta=1`` is the RevNet
coupling ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` with consecutive units as F and G. Because

    x_{k-1} = (x_{k+1} - alpha * x_k - R_k(x_k)) / beta,

the stage only keeps its last two states ``(x_{n-1}, x_n)``; ``_ReversibleFunction.backward`` walks
the units in reverse, recomputing each ``R_k`` once and using that one recompute both to rebuild
the previous state and for the vector-Jacobian product. See NOTE [ Stage backward ].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _mode
from ._replay import _ForwardState, batchnorms, frozen_running_stats

__all__ = ["ReversibleStage"]


class _ModuleUnit:
    """A unit that is one module's whole forward, ``U(h) = module(h)``, so ``R(h) = U(h) - h``.

    The unit may end in an activation (ResNet: ``relu(h + F(h))``) or hold several residuals
    (a ViT block); as a black box ``U(h) - h`` stays an exact function of it (DESIGN.md §2).
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.modules = [module]

    def tensors(self) -> list[Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def __call__(self, h: Tensor) -> Tensor:
        return self.module(h) - h


class _BranchUnit:
    """A unit whose residual branch is one module call: ``R(h) = module(h)`` (``x + self.f(x)``)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.modules = [module]

    def tensors(self) -> list[Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def __call__(self, h: Tensor) -> Tensor:
        return self.module(h)


class _GraphUnit:
    """A unit given by a region of a traced graph, run as generated code on ``root``.

    The code returns ``R(h)``, or ``U(h)`` when the unit ends in a post-add op
    (``subtract_input``), in which case ``R(h) = U(h) - h``.
    """

    def __init__(
        self,
        name: str,
        code: Any,
        root: nn.Module,
        modules: list[nn.Module],
        tensors: list[Tensor],
        subtract_input: bool,
    ) -> None:
        self.name = name
        self.code = code
        self.root = root
        self.modules = modules
        self._tensors = tensors
        self.subtract_input = subtract_input

    def tensors(self) -> list[Tensor]:
        return list(self._tensors)

    def __call__(self, h: Tensor) -> Tensor:
        out = self.code(self.root, h)
        return out - h if self.subtract_input else out


def _stream_dtype(dtype: torch.dtype) -> torch.dtype:
    # NOTE: streams are never kept in half precision: bf16 unit outputs added to fp32 streams
    # subtract back almost exactly, bf16 streams gave 35-100 % gradient error (DESIGN.md §3).
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _combine(alpha: float, beta: float, x_prev: Tensor, x_cur: Tensor, r: Tensor) -> Tensor:
    """``beta * x_prev + alpha * x_cur + r``, skipping the terms whose coefficient is 0."""
    out = r if beta == 0 else torch.add(r, x_prev, alpha=beta)
    return out if alpha == 0 else torch.add(out, x_cur, alpha=alpha)


class ReversibleStage:
    """A chain of identity residual units run as a reversible two-stream coupling.

    Not an ``nn.Module``: it holds references to the units' modules, which stay where they are
    in the converted model, so ``state_dict()`` keys and ``Parameter`` objects do not change.

    Args:
        name: module path used in reports, e.g. ``"layer3"``.
        units: callables ``h -> R(h)``, each with ``.name`` and ``.modules``.
        alpha, beta: coupling coefficients. ``beta`` must be non-zero (the inverse divides by it).

    Attributes:
        last_reconstruction_error: after each reversible backward, ``max|x_-1 - x_0| / max|x_0|``
            (0-dim tensor, not synchronised): both are reconstructions of the stage input, so a
            large value means the coupling was not invertible in this precision.
    """

    def __init__(self, name: str, units: Sequence[Any], alpha: float = 0.0, beta: float = 1.0):
        if not units:
            raise ValueError("revify.ReversibleStage: a stage needs at least one unit")
        self.name = name
        self.units = list(units)
        self.alpha = alpha
        self.beta = beta
        self.last_reconstruction_error: Tensor | None = None
        # Debug switch used by revify.check: keep a copy of the input (defeats the memory
        # saving) so the reconstruction error is measured against the true input.
        self.record_input = False

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = float(value)

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        if float(value) == 0.0:
            raise ValueError(
                f"revify: stage {self.name}: beta=0 is not invertible "
                "(x_{k-1} = (x_{k+1} - alpha*x_k - R_k(x_k)) / beta); use beta > 0"
            )
        self._beta = float(value)

    def modules(self) -> list[nn.Module]:
        seen: dict[int, nn.Module] = {}
        for u in self.units:
            for m in u.modules:
                seen.setdefault(id(m), m)
        return list(seen.values())

    def unit_tensors(self) -> list[list[Tensor]]:
        """Per unit, the parameters and buffers it reads that require grad.

        A module shared by two units (``x + f(x)`` twice) appears in both lists.
        """
        out = []
        for u in self.units:
            ts: dict[int, Tensor] = {}
            for t in u.tensors():
                if t.requires_grad:
                    ts.setdefault(id(t), t)
            out.append(list(ts.values()))
        return out

    def tensors(self) -> list[Tensor]:
        """All tensors requiring grad read by the stage, once each (inputs of the function)."""
        flat: dict[int, Tensor] = {}
        for ts in self.unit_tensors():
            for t in ts:
                flat.setdefault(id(t), t)
        return list(flat.values())

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"revify: stage {self.name} expects a floating-point tensor, got "
                f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}"
            )
        tensors = self.tensors()
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(tensors))
        if not needs_grad or _mode.is_plain():
            return _forward(self, x, states=None)
        return _ReversibleFunction.apply(self, x, *tensors)

    def __repr__(self) -> str:
        return (
            f"ReversibleStage({self.name!r}, units={len(self.units)}, "
            f"alpha={self.alpha}, beta={self.beta})"
        )


def _forward(
    stage: ReversibleStage, x: Tensor, states: list[_ForwardState] | None
) -> tuple[Tensor, Tensor] | Tensor:
    """The coupled recurrence. With ``states`` it also records each unit's RNG/autocast state
    and returns ``(x_{n-1}, x_n)``; without, it returns ``x_n`` (plain or no-grad path)."""
    in_dtype = x.dtype
    sdtype = _stream_dtype(in_dtype)
    x_prev = x_cur = x.to(sdtype)
    for unit in stage.units:
        if states is not None:
            states.append(_ForwardState(x.device))
        r = unit(x_cur.to(in_dtype)).to(sdtype)
        x_prev, x_cur = x_cur, _combine(stage.alpha, stage.beta, x_prev, x_cur, r)
        del r
    if states is not None:
        return x_prev, x_cur
    return x_cur.to(in_dtype)


class _ReversibleFunction(torch.autograd.Function):
    """Runs a :class:`ReversibleStage`, storing only ``(x_{n-1}, x_n)``.

    Inputs are ``(stage, x, *tensors)`` where ``tensors`` are every parameter/buffer of the units
    that requires grad, so that ``torch.autograd.grad(loss, params)``, DDP hooks and frozen
    parameters all behave as with ordinary autograd: gradients are returned, never assigned.
    """

    @staticmethod
    def forward(ctx: Any, stage: ReversibleStage, x: Tensor, *tensors: Tensor) -> Tensor:
        states: list[_ForwardState] = []
        x_prev, x_cur = _forward(stage, x, states)
        out = x_cur.to(x.dtype)
        ctx.stage = stage
        ctx.states = states
        ctx.in_dtype = x.dtype
        ctx.save_for_backward(x_prev, x_cur)
        ctx.reference = x.detach().clone() if stage.record_input else None
        return out

    @staticmethod
    def backward(ctx: Any, g_out: Tensor) -> tuple[Tensor | None, ...]:
        # NOTE [ Stage backward ]
        # Walking k = n-1 .. 0 we hold x_{k+1}, x_k ("hi", "mid") and the adjoints a_{k+1}
        # (complete) and a_k (partial). One recompute z = R_k(x_k) with grad gives both
        # x_{k-1} = (x_{k+1} - alpha x_k - z) / beta and the vjp (dx_k, dtheta_k) = z'^T a_{k+1};
        # then a_{k-1} = beta a_{k+1} and a_k += alpha a_{k+1} + dx_k. At the end x_{-1} and x_0
        # both reconstruct the input, and dL/dx = a_0 + a_{-1}. Tensors we allocated are updated
        # in place; saved tensors and autograd's g_out are never written.
        stage: ReversibleStage = ctx.stage
        alpha, beta = stage.alpha, stage.beta
        x_prev, x_cur = ctx.saved_tensors
        unit_tensors = stage.unit_tensors()
        flat = stage.tensors()
        needs = ctx.needs_input_grad[2:]
        if len(flat) != len(needs):
            raise RuntimeError(
                f"revify: stage {stage.name}: the set of tensors requiring grad changed between "
                "forward and backward (requires_grad toggled mid-step?); recompute the forward"
            )
        index = {id(t): i for i, t in enumerate(flat)}
        grads: list[Tensor | None] = [None] * len(flat)
        bns = batchnorms(stage.modules())
        n = len(stage.units)
        # need_dx[k]: is dL/dx_k needed, i.e. does anything at or before unit k-1 need a grad?
        need_dx = [bool(ctx.needs_input_grad[1])] * (n + 1)
        for k in range(1, n + 1):
            need_dx[k] = need_dx[k - 1] or any(needs[index[id(t)]] for t in unit_tensors[k - 1])

        hi, hi_owned = x_cur, False  # x_{k+1}
        mid, mid_owned = x_prev, False  # x_k
        a_hi: Tensor | None = g_out.to(x_cur.dtype)  # a_{k+1}; None means zero
        a_hi_owned = a_hi is not g_out
        a_mid: Tensor | None = None  # a_k
        a_mid_owned = False
        completed = True
        for k in reversed(range(n)):
            unit = stage.units[k]
            wanted = [t for t in unit_tensors[k] if needs[index[id(t)]]]
            if not need_dx[k] and not wanted:
                completed = False  # nothing at or below unit k needs a gradient
                break
            with torch.enable_grad(), ctx.states[k].replay(), frozen_running_stats(bns):
                h = mid.detach().requires_grad_(need_dx[k])
                z = unit(h.to(ctx.in_dtype)).to(h.dtype)
            with torch.no_grad():
                lo = hi.sub_(z) if hi_owned else hi - z
                if alpha != 0:
                    lo.sub_(mid, alpha=alpha)
                if beta != 1:
                    lo.div_(beta)
            del hi
            inputs = ([h] if need_dx[k] else []) + wanted
            vjp: Sequence[Tensor | None] = (None,) * len(inputs)
            if a_hi is not None and z.requires_grad:
                vjp = torch.autograd.grad(z, inputs, a_hi, allow_unused=True)
            del z, h
            dh = vjp[0] if need_dx[k] else None
            for t, g in zip(wanted, vjp[len(inputs) - len(wanted):], strict=True):
                if g is not None:
                    i = index[id(t)]
                    grads[i] = g if grads[i] is None else grads[i] + g
            del vjp
            # a_{k-1} = beta a_{k+1};  a_k += alpha a_{k+1} + dx_k
            if a_hi is None or beta == 1:
                a_lo, a_lo_owned = a_hi, a_hi_owned
            else:
                a_lo, a_lo_owned = a_hi * beta, True
            terms = [(dh, 1.0)]
            if alpha != 0 and a_hi is not None:
                terms.append((a_hi, alpha))
            for term, coef in terms:
                if term is None:
                    continue
                if a_mid is None and coef == 1:
                    # A pass-through branch can hand back a_{k+1} itself: never alias it.
                    a_mid, a_mid_owned = (term.clone(), True) if term is a_hi else (term, False)
                elif a_mid is None:
                    a_mid, a_mid_owned = term * coef, True
                elif a_mid_owned:
                    a_mid.add_(term, alpha=coef)
                else:
                    a_mid, a_mid_owned = torch.add(a_mid, term, alpha=coef), True
            del dh, a_hi, terms
            hi, hi_owned, mid, mid_owned = mid, mid_owned, lo, True
            a_hi, a_hi_owned, a_mid, a_mid_owned = a_mid, a_mid_owned, a_lo, a_lo_owned
        if completed:
            # hi = x_0 and mid = x_{-1}: two reconstructions of the stage input.
            with torch.no_grad():
                ref = hi if ctx.reference is None else ctx.reference.to(hi.dtype)
                scale = ref.abs().max().clamp_min(torch.finfo(hi.dtype).tiny)
                err = torch.maximum((mid - ref).abs().max(), (hi - ref).abs().max())
                stage.last_reconstruction_error = err / scale
        dx = None
        if ctx.needs_input_grad[1]:
            parts = [a for a in (a_hi, a_mid) if a is not None]
            dx = parts[0] + parts[1] if len(parts) == 2 else parts[0] if parts else None
            dx = torch.zeros_like(x_cur) if dx is None else dx
            dx = dx.to(ctx.in_dtype)
        return (None, dx, *grads)
