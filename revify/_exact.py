"""Fixed-point stream arithmetic: exact reconstruction at any depth and any ``beta = 1/d``.

See NOTE [ Exact streams ]. A stage in exact mode (``ReversibleStage(exact=True)``) runs its
forward on a :class:`Grid` chosen for that forward alone; :func:`rounded` and
:func:`next_state` make one step of the recurrence on it and :func:`prev_state` its exact
inverse.
"""

from __future__ import annotations

import functools
import math
import sys
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

    @functools.cached_property
    def big(self) -> Tensor:
        """``1.5 * 2^(p-1) * delta`` (NOTE [ Stream kernels ])."""
        return _big(self.delta)

    def extrema(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(min, max)`` of ``x`` (of its finite values if ``finite_only``), for :func:`top`."""
        return torch.aminmax(torch.where(torch.isfinite(x), x, 0.0) if self.finite_only else x)

    @property
    def limit(self) -> Tensor:
        """States must stay below this in magnitude."""
        return self.delta * 2.0**GRID_BITS


def top(extrema: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``max |x|`` over the states whose :meth:`Grid.extrema` are given (a few kernels per stage,
    one ``aminmax`` per state)."""
    lo = torch.stack([e[0] for e in extrema]).min()
    hi = torch.stack([e[1] for e in extrema]).max()
    return torch.maximum(hi, lo.neg())


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


# NOTE [ Stream kernels ]
# Each pass over a stage-sized tensor is a kernel launch and a trip through memory; on a GPU at
# batch 64 the launches are the step time (issue 14). So every operation here is a whole-tensor
# op, in place where the memory is ours, and the integer arithmetic is read from the floats'
# bits instead of dividing by delta:
#   * with BIG = 1.5 * 2^(p-1) * delta (p the significand bits), (v + BIG) - BIG is v rounded
#     to a multiple of delta (nearest, ties to even) for |v| < 2^(p-2) delta, and the float
#     v + BIG, a state difference D * delta moved up by BIG, has the integer BIG/delta + D as
#     its significand: its low k bits are D mod 2^k (BIG/delta is a multiple of 2^(p-2));
#   * clearing them gives (BIG/delta + d floor(D/d)) delta; setting them back (an OR, the low
#     bits being zero) inverts that.
# The remainders are packed from those bits, a group of 8/gcd(8, b) values to a few bytes, by
# one multiply-and-sum. Packed values are laid out in the state's memory order (the forward
# records it, the backward reads the rebuilt state in the same order), so no copy is needed
# for channels-last states. The only slicing left is for the CPU: TensorIterator there
# allocates a whole fp32 copy of a bf16 operand of an fp32 in-place op, so that subtraction is
# done a slice at a time (not on fake tensors, which allocate nothing).


def _mixed_sub_(t: Tensor, m: Tensor) -> None:
    """``t -= m`` without a full-size hidden copy of a lower-precision ``m`` on the CPU."""
    if t.device.type != "cpu" or m.dtype == t.dtype or is_fake(t) or t.dim() == 0:
        t.sub_(m)
        return
    step = -(-t.shape[0] // min(16, t.shape[0]))
    for i in range(0, t.shape[0], step):
        t[i : i + step].sub_(m[i : i + step])


def rounded(u: Tensor, m: Tensor | None, x_cur: Tensor, inner: float, grid: Grid,
            own: bool) -> Tensor:
    """``(u - m + inner * x_k)`` rounded onto the grid, in the stream dtype: in ``u``'s memory if
    ``own`` (and it has that dtype), else in a new tensor (NOTE [ Stream kernels ])."""
    if own and u.dtype == x_cur.dtype:
        t = u
    elif m is not None and u.dtype == m.dtype == x_cur.dtype:
        t = torch.sub(u, m, out=torch.empty_like(x_cur))  # one pass: the same u - m
        m = None
    else:
        t = torch.empty_like(x_cur)
        t.copy_(u)
    if m is not None:
        _mixed_sub_(t, m)
    if inner:
        t.add_(x_cur, alpha=inner)
    return t.add_(grid.big).sub_(grid.big)


def _order(t: Tensor) -> tuple[int, ...]:
    """``t``'s dimensions from the outermost in memory (its layout, for :func:`_flat`)."""
    try:
        return tuple(t.dim_order())
    except (RuntimeError, ValueError):  # not dense: treated as row-major (a copy is made)
        return tuple(range(t.dim()))


def _flat(t: Tensor, order: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """A flat view of ``t`` in the memory order ``order``; when ``t`` is not laid out that way,
    a flat copy, returned with the view to copy it back into."""
    p = t.permute(order) if order else t
    if p.is_contiguous():
        return p.view(-1), None
    return p.contiguous().view(-1), p


def _int_view(t: Tensor) -> Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _big(delta: Tensor) -> Tensor:
    p = {torch.float32: 24, torch.float64: 53}[delta.dtype]
    return delta * (1.5 * 2.0 ** (p - 1))


# NOTE [ Stream slices ]
# The inverse needs two temporaries of a state (the rounded unit output and the unpacked
# remainders), the forward one (the remainders before packing). Formed whole they raised the
# simulated ResNet-50 bf16 batch-64 peak by a state (+12 %); formed a slice at a time they cost
# one slice. A slice is a run of rows of dimension 0 of at most _SLICE elements (32 MiB of
# fp32): below that size the launches, not the bytes, are what an elementwise pass costs on a
# GPU (an H100 moves 64 MiB in about as long as the host takes to launch a kernel), so small
# states are never cut and large ones are cut only where the passes are long anyway.
_SLICE = 1 << 23  # a multiple of every packing group


def _row_slices(t: Tensor) -> list[slice]:
    """Runs of rows of ``t`` of at most _SLICE elements each (NOTE [ Stream slices ])."""
    row = t[0].numel() if t.dim() else 1
    if t.dim() == 0 or t.numel() <= _SLICE:
        return [slice(None)]
    rows = max(1, _SLICE // row)
    return [slice(i, i + rows) for i in range(0, t.shape[0], rows)]


def chunks(n: int) -> list[slice]:
    """Ranges of at most _SLICE elements of a flat tensor of ``n`` (whole packing groups: the
    packed bytes of chunk ``i`` follow those of chunk ``i - 1``)."""
    return [slice(i, min(n, i + _SLICE)) for i in range(0, n, _SLICE)] or [slice(0, 0)]


def packed_range(sl: slice, per: int, nbytes: int) -> slice:
    return slice(sl.start // per * nbytes, -(-sl.stop // per) * nbytes)


def next_state(
    grid: Grid, d: int, outer: float, t: Tensor, x_prev: Tensor, x_cur: Tensor,
    own_prev: bool, first: bool,
) -> tuple[Tensor, Packed | None]:
    """``x_{k+1}``, formed in the memory of ``t = rounded(...)``, and the packed remainders
    ``D mod d`` (None when d = 1 or at the first step, where ``x_{k-1} = x_k``). ``x_prev`` is
    overwritten if ``own_prev``. Run without grad."""
    packed = None
    if d == 1:
        t.add_(x_prev)
    elif not first:
        per, nbytes = _group(_bits(d))
        n = x_cur.numel()
        data = torch.empty(packed_size(n, d), dtype=torch.uint8, device=x_cur.device)
        y = x_prev.sub_(x_cur) if own_prev else torch.sub(x_prev, x_cur)  # D * delta
        order = _order(y)
        flat, back = _flat(y, order)
        if d & (d - 1) == 0:
            flat.add_(grid.big)
            bits = _int_view(flat)
            for sl in chunks(n):  # the remainders' temporary: a slice
                out = data[packed_range(sl, per, nbytes)]
                pack(torch.bitwise_and(bits[sl], d - 1), d, out=out)
            bits.bitwise_and_(-d)  # (BIG/delta + d * floor(D/d)) * delta
            flat.sub_(grid.big)  # d * floor(D/d) * delta
            scale = 1.0 / d  # a power of two: exact
        else:
            flat.div_(grid.delta)
            r = torch.remainder(flat, d)
            pack(r.to(_int_view(flat).dtype), d, out=data)
            flat.sub_(r).div_(d).mul_(grid.delta)  # floor(D/d) * delta, every step exact
            del r
            scale = 1.0
        if back is not None:
            back.copy_(flat.view(back.shape))
        t.add_(y, alpha=scale)
        del y, flat, back
        packed = Packed(data, order)
    if outer:
        t.add_(x_cur, alpha=outer)
    return t, packed


def prev_state(
    grid: Grid, d: int, outer: float, inner: float, u: Tensor, m: Tensor | None,
    x_cur: Tensor, x_next: Tensor, packed: Packed | None, own_next: bool = False,
) -> Tensor:
    """The exact inverse of :func:`next_state`: ``x_{k-1}`` from ``x_k``, ``x_{k+1}``, the
    recomputed ``u`` and the packed remainders (None: zero), in ``x_next``'s memory if
    ``own_next``, else in a new tensor; its temporaries a slice at a time (NOTE [ Stream
    slices ]). Run without grad."""
    slices = _row_slices(x_cur)
    # one slice: x_{k+1} - t made in one pass (None until then), else x_{k+1} or its copy
    out = x_next if own_next else None if len(slices) == 1 else x_next.clone()
    for sl in slices:
        t = rounded(u[sl], None if m is None else m[sl], x_cur[sl], inner, grid, own=False)
        if out is None:
            out = torch.sub(x_next, t, out=torch.empty_like(x_next))
        else:
            out[sl].sub_(t)
        del t  # before the next slice's is made
    if outer:
        out.sub_(x_cur, alpha=outer)
    if d == 1:
        return out  # x_{k-1}
    # out = floor(D / d) * delta
    power = d & (d - 1) == 0
    if power:  # d * out + BIG in one pass (d * out is exact)
        torch.add(grid.big, out, alpha=d, out=out)
    else:
        out.mul_(d)
    if packed is not None:
        per, nbytes = _group(_bits(d))
        flat, back = _flat(out, packed.order)
        n = flat.numel()
        scratch = torch.empty(min(n, _SLICE) + per, dtype=_int_view(flat).dtype,
                              device=flat.device)
        for sl in chunks(n):
            data = packed.data[packed_range(sl, per, nbytes)]
            r = unpack(data, d, sl.stop - sl.start, into=scratch)
            if power:
                _int_view(flat[sl]).bitwise_or_(r)  # the low bits are zero
            else:
                flat[sl].add_(r.to(flat.dtype).mul_(grid.delta))
            del r
        del scratch
        if back is not None:
            back.copy_(flat.view(back.shape))
    if power:
        out.sub_(grid.big)
    return out.add_(x_cur)


# Remainders of d <= 2^b take b bits; stored at 1, 2, 4, 6 or 8 bits per element, a group of
# `per` values in `nbytes` bytes.
def _bits(d: int) -> int:
    b = max(1, (d - 1).bit_length())
    widths = (1, 2, 4, 6, 8) if sys.byteorder == "little" else (1, 2, 4, 8)  # 6: see pack
    return next(w for w in widths if w >= b)


def _group(b: int) -> tuple[int, int]:
    return (4, 3) if b == 6 else (8 // b, 1)


def bit_width(d: int) -> int:
    """Bits a remainder of ``d`` is packed at."""
    return _bits(d)


def group(d: int) -> tuple[int, int]:
    """``(per, nbytes)``: remainders of ``d`` are packed ``per`` values to ``nbytes`` bytes."""
    return _group(_bits(d))


def packed_size(n: int, d: int) -> int:
    """Bytes :func:`pack` makes of ``n`` remainders of ``d``."""
    per, nbytes = group(d)
    return -(-n // per) * nbytes


@dataclass(frozen=True)
class Packed:
    """The packed remainders of one step, and the memory order they follow."""

    data: Tensor
    order: tuple[int, ...]


_CONSTANTS: dict[tuple[Any, ...], Tensor] = {}


def _constant(values: tuple[int, ...], dtype: torch.dtype, like: Tensor) -> Tensor:
    """A small constant tensor on ``like``'s device, made once per device (``torch.tensor(list,
    device="cuda")`` copies from pageable host memory: a synchronisation at every call); made
    afresh for fake and meta tensors, which must not meet a real one."""
    if is_fake(like):
        return torch.tensor(values, dtype=dtype, device=like.device)
    key = (values, dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=like.device)
    return t


def pack(r: Tensor, d: int, out: Tensor | None = None) -> Tensor:
    """The flat integer remainders ``r`` (each below ``d``; overwritten) packed at
    :func:`_bits` each into uint8, padded with zeros to whole groups (into ``out`` if given)."""
    b = _bits(d)
    per, nbytes = _group(b)
    n = r.numel()
    if n % per:
        r = torch.cat([r, r.new_zeros(per - n % per)])
    g = r.view(-1, per)
    weights = _constant(tuple(1 << (b * j) for j in range(per)), r.dtype, r)
    v = g.mul_(weights).sum(-1, dtype=torch.int32)  # one integer per group, < 2^24
    if nbytes == 1:
        return v.to(torch.uint8) if out is None else out.copy_(v)
    # the low three bytes of each int32 (little-endian, NOTE [ Stream kernels ])
    low = v.view(torch.uint8).view(-1, 4)[:, :nbytes]
    return low.reshape(-1) if out is None else out.view(-1, nbytes).copy_(low).view(-1)


def unpack(packed: Tensor, d: int, n: int, into: Tensor | None = None) -> Tensor:
    """The first ``n`` remainders :func:`pack` packed, as integers (int32, or ``into``'s dtype,
    written into ``into``'s memory when it has room)."""
    b = _bits(d)
    per, nbytes = _group(b)
    groups = packed.numel() // nbytes
    dtype = torch.int32 if into is None else into.dtype
    if into is not None and into.numel() >= groups * per:
        work = into.view(-1)[: groups * per]
    else:
        work = torch.empty(groups * per, dtype=dtype, device=packed.device)
    if nbytes == 1:
        v = packed.to(dtype)
    else:
        w = work[: groups * nbytes].view(-1, nbytes)
        w.copy_(packed.view(-1, nbytes))
        scale = _constant(tuple(1 << (8 * j) for j in range(nbytes)), dtype, packed)
        v = w.mul_(scale).sum(-1, dtype=dtype)
    shifts = _constant(tuple(b * j for j in range(per)), dtype, packed)
    out = work.view(-1, per)
    torch.bitwise_right_shift(v.unsqueeze(-1), shifts, out=out)
    return out.bitwise_and_((1 << b) - 1).view(-1)[:n]


# Stage outputs under bf16 autocast (NOTE [ bf16 stage output ] in coupling.py).


def _round_bits(x: Tensor) -> Tensor:
    """``(bits(x) + 2^15) >> 16`` as int32: ``x`` rounded to bf16, ties away from zero."""
    return (x.view(torch.int32) + 0x8000).bitwise_right_shift_(16)


def _bf16(x: Tensor, top: Tensor) -> Tensor:
    hi = top.to(torch.int16).view(torch.bfloat16)
    # NaNs whose top 16 bits are all ones carry into the sign bit (0x7fffffff, CUDA's NaN)
    return hi.masked_fill_(torch.isnan(x), float("nan"))


def bf16_of(x: Tensor) -> Tensor:
    """float32 ``x`` in bf16, ties away from zero (NaNs stay NaN)."""
    return _bf16(x, _round_bits(x))


def split_bf16(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, rest)`` for float32 ``x``: ``hi`` is :func:`bf16_of` ``x``, ``rest`` the int16
    that :func:`join_bf16` needs to give ``x`` back bit for bit."""
    t = _round_bits(x)
    hi = _bf16(x, t)
    t.bitwise_left_shift_(16)
    rest = torch.sub(x.view(torch.int32), t, out=t).to(torch.int16)
    return hi, rest


def join_bf16(hi: Tensor, rest: Tensor) -> Tensor:
    """The float32 tensor that :func:`split_bf16` split."""
    t = hi.view(torch.int16).to(torch.int32).bitwise_left_shift_(16)
    return t.add_(rest).view(torch.float32)
