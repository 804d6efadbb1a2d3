"""Fixed-point stream arithmetic: exact reconstruction at any depth and any ``beta = 1/d``.

See NOTE [ Exact streams ]. A stage in exact mode (``ReversibleStage(exact=True)``) runs its
forward on a :class:`Grid` chosen for that forward alone; :func:`rounded` and
:func:`next_state` make one step of the recurrence on it and :func:`prev_state` its exact
inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []

# NOTE [ Exact streams ]
# With beta < 1 the inverse divides by beta at every unit and float rounding grows like
# beta^-n (DESIGN.md §3). In exact mode the streams hold values on a fixed-point grid
# x = X * delta, delta a power of two and X an integer with |X| < 2^GRID_BITS, so every stream
# value is an fp32 (or fp64) float and sums and differences of them are exact. A step is
# written
#
#     x_{k+1} = beta * (x_{k-1} - x_k) + s * x_k + (u_k - m_k),     s = a + beta,
#
# (``a``, ``m`` from coupling._step_terms; beta = 1/d): the same real function as
# ``beta x_{k-1} + a x_k + u - m``. On the grid it becomes
#
#     X_{k+1} = floor(D / d) + c * X_k + round((u_k - m_k + i * x_k) / delta),   D = X_{k-1} - X_k,
#
# where (c, i) = (s, 0) when s is an integer (the faithful coupling alpha = 1 - beta has s = 0
# for units that end in an activation and s = 1 otherwise) and (0, s) when it is not. The
# remainder D mod d (log2 d bits, packed) is kept for the inverse (MacKay et al., 2018):
# D = d * (X_{k+1} - c X_k - round(...)) + (D mod d). With d = 1 the step is
# X_{k+1} = X_{k-1} + c X_k + round(...), and nothing is kept. Every operation but the rounding
# of the unit's output is exact, so the reconstruction is exact at any depth, whatever the
# order a kernel evaluates in; the rounding is part of the converted function and its gradient
# is taken as the identity (straight-through).
#
# The grid is chosen per forward from that forward's input alone (so one batch leaves no trace
# on the next): delta = 2^(e + HEADROOM_BITS - GRID_BITS) with 2^(e-1) <= max|x_0| < 2^e, a
# resolution of 2^-13 of the input's largest value's power of two, with 8 bits of room for
# growth. A forward whose states outgrow it is redone once on a grid sized from the largest
# state seen (with the same random draws, running statistics updated once); a stage whose
# states are not finite is redone with maxima taken over its finite values, so a NaN in one
# sample stays in that sample.
#
# floor(D / d) and D mod d for d a power of two come from the bits of D + 1.5 * 2^(p-1) (p the
# float's significand bits): for |D| < 2^(p-2) that float's low significand bits are D mod 2^k.
# |X| < 2^21 keeps |D| < 2^22, so fp32 (p = 24) works without an integer copy of the state.

GRID_BITS = 21
HEADROOM_BITS = 8
MARGIN_BITS = 2
_FLOOR = 2.0**-60  # grid of an all-zero input: sized as if its largest value were 2^-60


def max_abs(x: Tensor) -> Tensor:
    """``max |x|`` (0-dim) in one pass without a temporary (``aminmax`` was ~7x faster on CPU
    than ``linalg.vector_norm(x, inf)``)."""
    lo, hi = torch.aminmax(x)
    return torch.maximum(hi, -lo)


def finite_max_abs(x: Tensor) -> Tensor:
    """``max |x|`` over the finite elements of ``x`` (0 when there are none)."""
    return max_abs(torch.where(torch.isfinite(x), x, 0.0))


@dataclass(frozen=True)
class Grid:
    """The fixed-point grid of one stage forward: ``delta`` (0-dim, a power of two) and whether
    maxima ignore non-finite values (the redo of a forward whose states were not finite)."""

    delta: Tensor
    finite_only: bool = False

    def max_abs(self, x: Tensor) -> Tensor:
        return finite_max_abs(x) if self.finite_only else max_abs(x)

    @property
    def limit(self) -> Tensor:
        """States must stay below this in magnitude."""
        return self.delta * 2.0**GRID_BITS


def _step(top: Tensor, bits: int) -> Tensor:
    """``2^(e + bits - GRID_BITS)`` with ``2^(e-1) <= top < 2^e``, in ``top``'s dtype: the
    exponent is read exactly (``frexp``), so fp32 and fp64 copies get the same grid."""
    _, e = torch.frexp(top.clamp_min(_FLOOR))
    return torch.ldexp(torch.ones_like(top), e + (bits - GRID_BITS))


def first_grid(x: Tensor, dtype: torch.dtype, finite_only: bool = False) -> Grid:
    """The grid a forward starts on, from the stage input ``x`` alone, for ``dtype`` streams."""
    top = finite_max_abs(x) if finite_only else max_abs(x)
    return Grid(_step(top.detach().to(dtype), HEADROOM_BITS), finite_only)


def is_fake(t: Tensor) -> bool:
    """Fake and meta tensors (shape-only passes: the audit, ``model.to("meta")``) have no
    values to check."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.is_meta


def regrid(x: Tensor, grid: Grid, top: Tensor) -> Grid | None:
    """After a forward on ``grid`` whose states reached ``top`` (max |state|, 0-dim): None if
    they fit, else the grid to redo the forward on. The one host synchronisation of an exact
    stage forward."""
    if is_fake(top):
        return None
    top_v, limit = torch.stack([top.float(), grid.limit.float()]).tolist()
    if not math.isfinite(top_v):
        return first_grid(x, top.dtype, finite_only=True)
    if top_v < limit:
        return None
    return Grid(_step(top.detach(), MARGIN_BITS), grid.finite_only)


def on_grid(v: Tensor, delta: Tensor) -> Tensor:
    """``v`` rounded onto the grid, as a new tensor."""
    return torch.div(v, delta).round_().mul_(delta)


def coefficients(a: float, beta: float, d: int) -> tuple[float, float]:
    """``(c, i)``: the outer (exact) and inner (rounded with the unit) coefficient of ``x_k``."""
    s = a if d == 1 else a + beta
    return (s, 0.0) if float(s).is_integer() else (0.0, s)


def _slices(t: Tensor, parts: int = 16) -> list[Any]:
    """Index tuples cutting ``t`` into up to ``parts`` slices along its first dimension: work
    done a slice at a time needs temporaries of one slice, not of a whole state."""
    if t.dim() == 0 or t.shape[0] < 2:
        return [(...,)]
    step = -(-t.shape[0] // min(parts, t.shape[0]))
    return [(slice(i, i + step),) for i in range(0, t.shape[0], step)]


def rounded(u: Tensor, m: Tensor | None, x_cur: Tensor, inner: float, delta: Tensor,
             own: bool) -> Tensor:
    """``round((u - m + inner * x_k) / delta)`` in the stream dtype: in ``u``'s memory if
    ``own`` (and it has that dtype), else in a new tensor, formed a slice at a time so that
    no temporary of a whole state is made (on the CPU, ``t -= m`` with a bf16 ``m`` would
    allocate an fp32 copy of ``m``)."""
    if own and u.dtype == x_cur.dtype:
        t = u if m is None else u.sub_(m)
        if inner:
            t.add_(x_cur, alpha=inner)
        return t.div_(delta).round_()
    t = torch.empty_like(x_cur)
    for sl in _slices(t) if m is not None or t.device.type == "cpu" else [(...,)]:
        ts = t[sl].copy_(u[sl])
        if m is not None:
            ts.sub_(m[sl])
        if inner:
            ts.add_(x_cur[sl], alpha=inner)
        ts.div_(delta).round_()
    return t


def _magic(dtype: torch.dtype) -> tuple[float, torch.dtype]:
    p = {torch.float32: 24, torch.float64: 53}[dtype]  # significand bits
    return 1.5 * 2.0 ** (p - 1), torch.int32 if dtype == torch.float32 else torch.int64


def _floor_divide_(diff: Tensor, delta: Tensor, d: int) -> Tensor:
    """Turns ``diff = D * delta`` into ``floor(D / d)`` in place; returns ``D mod d`` (uint8,
    flat, padded with zeros to a multiple of 8)."""
    n = diff.numel()
    rem = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=diff.device)
    diff.div_(delta)
    if d & (d - 1) == 0:  # a power of two: D mod d from the bits (NOTE [ Exact streams ])
        magic, int_dtype = _magic(diff.dtype)
        diff.add_(magic)
        rem[:n].copy_(diff.view(int_dtype).flatten())  # the low byte (modular conversion)
        rem.bitwise_and_(d - 1)
        # floor(D / d) = round((D - (d-1)/2) / d), every step exact. (Subtracting the uint8
        # remainder instead would make TensorIterator allocate a float copy of it.)
        diff.sub_(magic).sub_((d - 1) / 2).div_(d).round_()
    else:
        r = torch.remainder(diff, d)
        rem[:n].copy_(r.flatten())
        diff.sub_(r).div_(d)
        del r
    return rem


def next_state(
    grid: Grid, d: int, outer: float, t: Tensor, x_prev: Tensor, x_cur: Tensor,
    own_prev: bool, first: bool,
) -> tuple[Tensor, Tensor | None]:
    """``x_{k+1}``, formed in the memory of ``t = rounded(...)``, and the remainder ``D mod d``
    (None when d = 1 or at the first step, where ``x_{k-1} = x_k``). ``x_prev`` is
    overwritten if ``own_prev``. Run without grad."""
    rem = None
    if d == 1:
        t.mul_(grid.delta).add_(x_prev)
    elif first:
        t.mul_(grid.delta)
    else:
        diff = x_prev.sub_(x_cur) if own_prev else torch.sub(x_prev, x_cur)
        rem = _floor_divide_(diff, grid.delta, d)
        t.add_(diff).mul_(grid.delta)
        del diff
    if outer:
        t.add_(x_cur, alpha=outer)
    return t, rem


def _rows(packed: Tensor, d: int, like: Tensor, sl: tuple[Any, ...]) -> Tensor:
    """The unpacked remainders of ``like[sl]`` (a slice of whole rows of dimension 0)."""
    if sl == (...,):
        return unpack(packed, d, 0, like.numel()).view(like.shape)
    row = like[0].numel()
    start, stop, _ = sl[0].indices(like.shape[0])
    return unpack(packed, d, start * row, stop * row).view(like[sl].shape)


def prev_state(
    grid: Grid, d: int, outer: float, inner: float, u: Tensor, m: Tensor | None,
    x_cur: Tensor, x_next: Tensor, rem: Tensor | None, own_next: bool = False,
) -> Tensor:
    """The exact inverse of :func:`next_state`: ``x_{k-1}`` from ``x_k``, ``x_{k+1}``, the
    recomputed ``u`` and the packed remainders (None: zero), in ``x_next``'s memory if
    ``own_next``, else in a new tensor. A slice at a time: the rounded ``u`` costs one
    slice, not a state, beside the unit's graph. Run without grad."""
    out = x_next if own_next else torch.empty_like(x_cur)
    for sl in _slices(out):
        o = out[sl] if own_next else out[sl].copy_(x_next[sl])
        t = rounded(u[sl], None if m is None else m[sl], x_cur[sl], inner, grid.delta, False)
        o.sub_(t.mul_(grid.delta))  # x_{k+1} - round(...) * delta
        del t
        if outer:
            o.sub_(x_cur[sl], alpha=outer)
        if d == 1:
            continue  # x_{k-1}
        o.mul_(d)  # d * floor(D / d) * delta
        if rem is not None:  # on the CPU the uint8 slice is copied to float for this
            o.addcmul_(_rows(rem, d, x_cur, sl), grid.delta)
        o.add_(x_cur[sl])
    return out


# Remainders of d <= 2^b take b bits; stored at 1, 2, 4, 6 or 8 bits per element.
def _bits(d: int) -> int:
    b = max(1, (d - 1).bit_length())
    return next(w for w in (1, 2, 4, 6, 8) if w >= b)


def pack(rem: Tensor, d: int) -> Tensor:
    """The flat uint8 remainders (length a multiple of 8) packed at :func:`_bits` per element."""
    b = _bits(d)
    if b == 8:
        return rem
    if b == 6:  # four remainders in three bytes
        r = rem.view(-1, 4)
        out = torch.empty(r.shape[0], 3, dtype=torch.uint8, device=rem.device)
        torch.bitwise_left_shift(r[:, 1], 6, out=out[:, 0]).bitwise_or_(r[:, 0])
        torch.bitwise_left_shift(r[:, 2], 4, out=out[:, 1]).bitwise_or_(r[:, 1] >> 2)
        torch.bitwise_left_shift(r[:, 3], 2, out=out[:, 2]).bitwise_or_(r[:, 2] >> 4)
        return out.view(-1)
    per = 8 // b
    r = rem.view(-1, per)
    out = r[:, 0].clone()
    for j in range(1, per):
        out.bitwise_or_(r[:, j] << (b * j))
    return out


def _unpack_flat(packed: Tensor, b: int) -> Tensor:
    if b == 8:
        return packed
    if b == 6:
        p = packed.view(-1, 3)
        out = torch.empty(p.shape[0], 4, dtype=torch.uint8, device=packed.device)
        torch.bitwise_and(p[:, 0], 63, out=out[:, 0])
        torch.bitwise_right_shift(p[:, 0], 6, out=out[:, 1]).bitwise_or_((p[:, 1] & 15) << 2)
        torch.bitwise_right_shift(p[:, 1], 4, out=out[:, 2]).bitwise_or_((p[:, 2] & 3) << 4)
        torch.bitwise_right_shift(p[:, 2], 2, out=out[:, 3])
    else:
        per, mask = 8 // b, (1 << b) - 1
        out = torch.empty(packed.numel(), per, dtype=torch.uint8, device=packed.device)
        for j in range(per):
            torch.bitwise_right_shift(packed, b * j, out=out[:, j]).bitwise_and_(mask)
    return out.view(-1)


def unpack(packed: Tensor, d: int, start: int, stop: int) -> Tensor:
    """Remainders ``start:stop`` (flat, in the order of the state's elements) of those
    :func:`pack` packed; only the bytes that hold them are unpacked."""
    b = _bits(d)
    group, nbytes = (4, 3) if b == 6 else (8 // b, 1)  # elements per group of whole bytes
    g0, g1 = start // group, -(-stop // group)
    flat = _unpack_flat(packed[g0 * nbytes : g1 * nbytes], b)
    return flat[start - g0 * group : stop - g0 * group]
