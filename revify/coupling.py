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


class _BranchUnit:
    """A unit whose residual branch is one module call: ``R(h) = module(h)`` (``x + self.f(x)``).

    Every unit has ``raw(h)`` and ``subtract_input``: ``R(h) = raw(h) - h`` when
    ``subtract_input``, else ``raw(h)``. The stage backward works with ``raw`` so that
    ``U(h) - h`` is never materialised as a separate tensor (NOTE [ Stage backward ]).
    """

    subtract_input = False

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.modules = [module]
        self.pattern = ""  # the residual pattern matched, for reports

    def tensors(self) -> list[Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def raw(self, h: Tensor) -> Tensor:
        return self.module(h)

    def __call__(self, h: Tensor) -> Tensor:
        out = self.raw(h)
        return out - h if self.subtract_input else out


class _Attr:
    """Stands for the tensor ``root.<target>`` in a unit's call arguments, looked up at each call
    (``model.to()`` replaces buffers)."""

    def __init__(self, root: nn.Module, target: str) -> None:
        self.root, self.target = root, target

    def get(self) -> Any:
        obj: Any = self.root
        for part in self.target.split("."):
            obj = getattr(obj, part)
        return obj


def _fill(template: Any) -> Any:
    """``template`` with every :class:`_Attr` replaced by its tensor."""
    if isinstance(template, _Attr):
        return template.get()
    if isinstance(template, (tuple, list)):
        return type(template)(_fill(t) for t in template)
    if isinstance(template, dict):
        return {k: _fill(v) for k, v in template.items()}
    return template


class _ModuleUnit(_BranchUnit):
    """A unit that is one module's whole forward, ``U(h) = module(h)``, so ``R(h) = U(h) - h``.

    The unit may end in an activation (ResNet: ``relu(h + F(h))``) or hold several residuals
    (a ViT block); as a black box ``U(h) - h`` stays an exact function of it (DESIGN.md §2).
    Further call arguments are constants or model attributes (EVA-02 blocks take ``rope=``, a
    buffer), the same at every call.
    """

    subtract_input = True

    def __init__(
        self, name: str, module: nn.Module, args: tuple = (), kwargs: dict | None = None
    ) -> None:
        super().__init__(name, module)
        self.args, self.kwargs = args, dict(kwargs or {})
        attrs: list[Any] = [*args, *self.kwargs.values()]
        self._attrs = [a for a in attrs if isinstance(a, _Attr)]

    def tensors(self) -> list[Tensor]:
        return [*super().tensors(), *(a.get() for a in self._attrs)]

    def raw(self, h: Tensor) -> Tensor:
        return self.module(h, *_fill(self.args), **_fill(self.kwargs))


class _GraphUnit(_BranchUnit):
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
        self.pattern = ""

    def tensors(self) -> list[Tensor]:
        return list(self._tensors)

    def raw(self, h: Tensor) -> Tensor:
        return self.code(self.root, h)


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

    def __init__(
        self,
        name: str,
        units: Sequence[Any],
        alpha: float = 0.0,
        beta: float = 1.0,
        exact: bool = False,
    ):
        if not units:
            raise ValueError("revify.ReversibleStage: a stage needs at least one unit")
        self.name = name
        self.units = list(units)
        self.exact = exact
        self.headroom_bits = _HEADROOM_BITS  # adapted by each exact forward
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
        if self.exact:
            d = round(1.0 / float(value))
            if not 1 <= d <= 256 or abs(1.0 / float(value) - d) > 1e-9:
                raise ValueError(
                    f"revify: stage {self.name}: exact streams need beta = 1/d with d an "
                    f"integer in 1..256, got beta={value}"
                )
        self._beta = float(value)

    @property
    def divisor(self) -> int:
        """``d`` with ``beta = 1/d`` (exact mode)."""
        return round(1.0 / self._beta)

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
            f"alpha={self.alpha}, beta={self.beta}, exact={self.exact})"
        )


# NOTE [ Exact streams ]
# With beta < 1 the inverse divides by beta at every unit and float rounding grows like
# beta^-n (DESIGN.md §3). In exact mode the streams hold values on a fixed-point grid
# x = X * delta, X an integer with |X| < 2^24: every stream value is an fp32 (or fp64) float
# and sums of them are exact. Each unit's output is rounded onto the grid, beta = 1/d
# multiplies as floor(X / d), and the remainder X mod d (log2 d bits, packed) is kept for the
# inverse (MacKay et al., 2018). Reconstruction is then exact at any depth. The rounding is part
# of the converted function and its gradient is taken as the identity. The grid does not depend
# on the stream dtype, so a float64 copy computes the same function (revify.check's reference).

_GRID_BITS = 24
# Bits of growth over a stage the grid allows at first (precision 2^-16 of the stage input's
# largest value). A forward whose streams outgrow it is redone on a coarser grid, which the
# stage then keeps (like a loss scaler that only backs off).
_HEADROOM_BITS = 8
_MARGIN_BITS = 2


def _grid(x: Tensor, headroom: int) -> Tensor:
    """Grid step ``delta`` (0-dim, a power of two) leaving ``headroom`` bits of growth."""
    top = x.detach().abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
    return torch.exp2(torch.ceil(torch.log2(top)) + headroom - _GRID_BITS)


def _on_grid(v: Tensor, delta: Tensor) -> Tensor:
    return torch.round(v / delta) * delta


def _exact_parts(alpha: float, x_cur: Tensor, r: Tensor, delta: Tensor) -> Tensor:
    """``q(alpha * x_k) + q(R_k(x_k))``: the part of a step recomputable from ``x_k``."""
    part = _on_grid(r, delta)
    if alpha == 1:
        return part + x_cur
    if alpha != 0:
        return part + _on_grid(alpha * x_cur, delta)
    return part


def _divide(x: Tensor, d: int, delta: Tensor) -> tuple[Tensor, Tensor]:
    """``floor(X / d) * delta`` and the remainder ``X mod d`` (uint8) for ``x = X * delta``."""
    big = torch.round(x / delta).to(torch.int64)
    quotient = torch.div(big, d, rounding_mode="floor")
    return quotient.to(x.dtype) * delta, (big - quotient * d).to(torch.uint8)


def _undivide(t: Tensor, rem: Tensor, d: int, delta: Tensor) -> Tensor:
    big = torch.round(t / delta).to(torch.int64) * d + rem.to(torch.int64)
    return big.to(t.dtype) * delta


def _pack(rem: Tensor, d: int) -> Tensor:
    """Two remainders per byte when they fit in 4 bits."""
    if d > 16:
        return rem
    flat = rem.flatten()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack(packed: Tensor, d: int, like: Tensor) -> Tensor:
    if d > 16:
        return packed
    out = torch.stack([packed & 15, packed >> 4], dim=1).flatten()
    return out[: like.numel()].view(like.shape)


def _forward(
    stage: ReversibleStage,
    x: Tensor,
    states: list[_ForwardState] | None,
    remainders: list[Tensor] | None = None,
) -> tuple[Tensor, ...] | Tensor:
    """The coupled recurrence. With ``states`` it also records each unit's RNG/autocast state
    (and, in exact mode, the packed remainders) and returns ``(x_{n-1}, x_n, delta)``; without,
    it returns ``x_n`` (plain or no-grad path, differentiable)."""
    if not stage.exact:
        out = _run(stage, x, states, remainders, None)
        return out[:2] + (None,) if states is not None else out[1].to(x.dtype)
    start = _ForwardState(x.device)
    x_prev, x_cur, delta, needed = _run(stage, x, states, remainders, stage.headroom_bits)
    if needed > stage.headroom_bits or not _fits(x_cur, x_prev, delta):
        # The streams outgrew the grid: redo with a coarser one, with the same random draws,
        # BatchNorm statistics already updated. The stage keeps the larger headroom.
        stage.headroom_bits = needed + _MARGIN_BITS
        start.restart()
        for collected in (states, remainders):
            if collected is not None:
                collected.clear()
        with frozen_running_stats(batchnorms(stage.modules())):
            x_prev, x_cur, delta, needed = _run(stage, x, states, remainders, stage.headroom_bits)
        if not _fits(x_cur, x_prev, delta):
            raise RuntimeError(
                f"revify: stage {stage.name}: exact streams outgrew their fixed-point grid "
                f"({needed} bits of growth); use exact=False for this model"
            )
    if states is not None:
        return x_prev, x_cur, delta
    return x_cur.to(x.dtype)


def _is_fake(t: Tensor) -> bool:
    """Fake tensors (the audit's shape-only passes) have no values to check."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _fits(x_cur: Tensor, x_prev: Tensor, delta: Tensor) -> bool:
    if _is_fake(x_cur):
        return True
    limit = delta * 2.0**_GRID_BITS
    return bool(torch.maximum(x_cur.detach().abs().amax(), x_prev.detach().abs().amax()) < limit)


def _run(
    stage: ReversibleStage,
    x: Tensor,
    states: list[_ForwardState] | None,
    remainders: list[Tensor] | None,
    headroom: int | None,
) -> tuple[Any, ...]:
    """One pass of the recurrence: ``(x_{n-1}, x_n, delta, bits of growth needed)``, on the
    fixed-point grid when ``headroom`` is given."""
    alpha, beta = stage.alpha, stage.beta
    in_dtype = x.dtype
    sdtype = _stream_dtype(in_dtype)
    x_prev = x_cur = x.to(sdtype)
    delta = None
    if headroom is not None:
        delta = _grid(x_cur, headroom)
        x_prev = x_cur = _straight_through(x_cur, _on_grid(x_cur, delta))
        d = stage.divisor
        base = x_cur.detach().abs().amax()
        top = base.clone()
    for k, unit in enumerate(stage.units):
        if states is not None:
            states.append(_ForwardState(x.device))
        # A half-precision r is added to the fp32 streams by type promotion, without a copy.
        r = unit(x_cur.to(in_dtype))
        if delta is None:
            x_prev, x_cur = x_cur, _combine(alpha, beta, x_prev, x_cur, r)
        else:
            r = r.to(sdtype)  # the grid ops below mix r with 0-dim delta: no promotion there
            with torch.no_grad():
                scaled, rem = _divide(x_prev, d, delta)
                exact = scaled + _exact_parts(alpha, x_cur, r, delta)
                top = torch.maximum(top, exact.abs().amax())
            if remainders is not None and k > 0 and d > 1:  # X mod 1 is always 0
                remainders.append(_pack(rem, d))
            del rem, scaled
            if torch.is_grad_enabled():
                exact = _straight_through(_combine(alpha, beta, x_prev, x_cur, r), exact)
            x_prev, x_cur = x_cur, exact
        del r
    needed = 0
    if delta is not None and not _is_fake(top):
        ratio = (top / base.clamp_min(torch.finfo(sdtype).tiny)).clamp_min(1.0)
        needed = int(torch.ceil(torch.log2(ratio)).item()) + 1  # +1: rounding up to 2^k
    return x_prev, x_cur, delta, needed


def _is_scratch(t: Tensor, *others: Tensor | None) -> bool:
    """Whether ``t``, a recomputed unit output, may be overwritten: made by the recompute (not a
    view, parameter or input) and sharing no memory with the tensors the backward still uses."""
    if t.grad_fn is None or t._base is not None or _is_fake(t):
        return False
    ptr = t.untyped_storage().data_ptr()
    return all(o is None or o.untyped_storage().data_ptr() != ptr for o in others)


def _straight_through(value: Tensor, exact: Tensor) -> Tensor:
    """``exact`` in the forward, the gradient of ``value`` in the backward."""
    if not value.requires_grad:
        return exact
    return value + (exact - value).detach()


class _ReversibleFunction(torch.autograd.Function):
    """Runs a :class:`ReversibleStage`, storing only ``(x_{n-1}, x_n)``.

    Inputs are ``(stage, x, *tensors)`` where ``tensors`` are every parameter/buffer of the units
    that requires grad, so that ``torch.autograd.grad(loss, params)``, DDP hooks and frozen
    parameters all behave as with ordinary autograd: gradients are returned, never assigned.
    """

    @staticmethod
    def forward(ctx: Any, stage: ReversibleStage, x: Tensor, *tensors: Tensor) -> Tensor:
        states: list[_ForwardState] = []
        remainders: list[Tensor] = []
        x_prev, x_cur, delta = _forward(stage, x, states, remainders)
        out = x_cur.to(x.dtype)
        ctx.stage = stage
        ctx.states = states
        ctx.in_dtype = x.dtype
        # The coefficients of this forward: a schedule may change them before backward.
        ctx.alpha, ctx.beta, ctx.exact = stage.alpha, stage.beta, stage.exact
        ctx.save_for_backward(x_prev, x_cur, *([delta] if ctx.exact else []), *remainders)
        ctx.reference = None
        if stage.record_input:  # exact streams start from the input rounded onto their grid
            ctx.reference = x.detach().to(x_cur.dtype)
            ctx.reference = _on_grid(ctx.reference, delta) if ctx.exact else ctx.reference.clone()
        return out

    @staticmethod
    def backward(ctx: Any, g_out: Tensor) -> tuple[Tensor | None, ...]:
        with torch.profiler.record_function(f"revify.stage_backward: {ctx.stage.name}"):
            return _stage_backward(ctx, g_out)


def _stage_backward(ctx: Any, g_out: Tensor) -> tuple[Tensor | None, ...]:
    """The body of :meth:`_ReversibleFunction.backward`."""
    # NOTE [ Stage backward ]
    # Walking k = n-1 .. 0 we hold x_{k+1}, x_k ("hi", "mid") and the adjoints a_{k+1}
    # (complete) and a_k (partial). One recompute z = R_k(x_k) with grad gives both
    # x_{k-1} = (x_{k+1} - alpha x_k - z) / beta and the vjp (dx_k, dtheta_k) = z'^T a_{k+1};
    # then a_{k-1} = beta a_{k+1} and a_k += alpha a_{k+1} + dx_k. At the end x_{-1} and x_0
    # both reconstruct the input, and dL/dx = a_0 + a_{-1}. Tensors we allocated are updated
    # in place; saved tensors and autograd's g_out are never written. For a unit R_k = U_k - id
    # the vjp runs through U_k alone and the "- id" part is added to a_k directly, so U_k - id
    # is never an autograd output; x_{k-1} is then written into U_k's memory.
    stage: ReversibleStage = ctx.stage
    alpha, beta, exact = ctx.alpha, ctx.beta, ctx.exact
    x_prev, x_cur, *extra = ctx.saved_tensors
    delta, *remainders = extra if exact else (None,)
    d = round(1.0 / beta)
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
    # The adjoints stay in the stage input's dtype, as plain autograd's gradients would be.
    a_hi: Tensor | None = g_out  # a_{k+1}; None means zero
    a_hi_owned = False
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
            h = mid.detach().to(ctx.in_dtype).requires_grad_(need_dx[k])
            u = unit.raw(h)  # R_k(x_k), or U_k(x_k) with R_k = U_k - id
        # The vjp first, through u alone (the "- id" part of R_k is added to a_k below), so that
        # u's graph is freed before the reconstruction, which then reuses u's memory.
        inputs = ([h] if need_dx[k] else []) + wanted
        vjp: Sequence[Tensor | None] = (None,) * len(inputs)
        if a_hi is not None and u.requires_grad:
            vjp = torch.autograd.grad(u, inputs, a_hi.to(u.dtype), allow_unused=True)
        with torch.no_grad():
            # z = R_k(x_k) exactly as the forward computed it (in the unit's dtype, then cast).
            reuse = _is_scratch(u, h, hi, mid, a_hi, a_mid, g_out)
            z = u.detach()
            if unit.subtract_input:
                z = z.sub_(h) if reuse else z - h
                reuse = True
            del u, h
            reuse = reuse and z.dtype == hi.dtype
            if exact:
                z = z.to(hi.dtype)
                # x_{-1} = x_0 needs no reconstruction (and has no remainder).
                t = hi - _exact_parts(alpha, mid, z, delta)
                if k == 0:
                    lo = mid
                elif d == 1:
                    lo = t
                else:
                    lo = _undivide(t, _unpack(remainders[k - 1], d, t), d, delta)
                del t
            else:
                # x_{k-1} = (x_{k+1} - z - alpha x_k) / beta, written into z's or x_{k+1}'s memory.
                if reuse:
                    lo = z.neg_().add_(hi)
                elif hi_owned:
                    lo = hi.sub_(z)
                else:
                    lo = hi - z
                if alpha != 0:
                    lo.sub_(mid, alpha=alpha)
                if beta != 1:
                    lo.div_(beta)
            del z, hi
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
        coef = alpha - 1.0 if unit.subtract_input else alpha  # "- id" of R_k = U_k - id
        if coef != 0 and a_hi is not None:
            terms.append((a_hi, coef))
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
        hi, hi_owned, mid, mid_owned = mid, mid_owned, lo, lo is not mid
        a_hi, a_hi_owned, a_mid, a_mid_owned = a_mid, a_mid_owned, a_lo, a_lo_owned
    if completed:
        # hi = x_0 and mid = x_{-1}: two reconstructions of the stage input.
        with torch.no_grad():
            inf = float("inf")
            ref = hi if ctx.reference is None else ctx.reference.to(hi.dtype)
            err = torch.linalg.vector_norm(mid - ref, inf)
            if ref is not hi:
                err = torch.maximum(err, torch.linalg.vector_norm(hi - ref, inf))
            scale = torch.linalg.vector_norm(ref, inf).clamp_min(torch.finfo(hi.dtype).tiny)
            stage.last_reconstruction_error = err / scale
    dx = None
    if ctx.needs_input_grad[1]:
        if a_hi is not None and a_mid is not None:
            if a_mid_owned:
                dx = a_mid.add_(a_hi)
            else:
                dx = a_hi.add_(a_mid) if a_hi_owned else a_hi + a_mid
        else:
            dx = a_hi if a_hi is not None else a_mid
        dx = torch.zeros_like(x_cur, dtype=ctx.in_dtype) if dx is None else dx
    return (None, dx, *grads)
