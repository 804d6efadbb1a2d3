"""Fused exact stream arithmetic: one kernel for each pass the exact path makes over a stage's
states (NOTE [ Fused streams ]).

Each function here takes the arguments of its op-by-op counterpart in :mod:`revify._exact`
(``first_grid``, the entry rounding, ``rounded`` + ``next_state``, ``prev_state``, the bf16
split and join) or ``coupling._adjoint_sum``, and runs it as one ``revify::`` custom op where
the op covers it, else op by op: the same bits either way.
"""

from __future__ import annotations

import functools
import importlib.util
import operator
import os
import warnings
from typing import Any

import torch
from torch import Tensor

from . import _exact

__all__: list[str] = []

# NOTE [ Fused streams ]
# One exact step op by op is ~20 passes over a state (the copy of u to fp32, the rounding, D,
# its remainders and their packing, the floor, two sums, an aminmax), its inverse ~25. On a GPU
# at batch 64 the host issues an op in about 25 us, so these were 22 ms of host time and 22 ms
# of device time in ResNet-50's modelled 73 ms bf16 step (issue 14). Fused, a step is one kernel
# that reads u, m and the two states once and writes x_{k+1} and the packed remainders: the same
# arithmetic, op for op in the same order. Every op is exact (sums of grid values, products by
# powers of two and by integers) except the rounding of u - m, which both do as
# (v + BIG) - BIG in fp32, so a contracted multiply-add changes no bit, and a state or a
# remainder made one way is undone the other way (tests/test_fused.py checks bit equality).
#
# The op's CUDA kernel is written in Triton (imported only there); its kernel elsewhere is
# _exact's op-by-op code run on whole packing groups. Which path a step takes depends only on
# the device (CUDA with Triton installed: fused), never on values, so a stage's forward and
# backward agree; fake tensors follow their device, so the audit simulates what runs. The
# environment variable REVIFY_FUSED_STREAMS=1 makes every device take the op (on the CPU its
# op-by-op kernel, the same bits): a fake CPU step then counts what a CUDA step issues, which is
# how ../shared/tools/gpu_time_model.py models the CUDA step on a CPU; =0 turns the op off.
#
# The op covers the steps of the faithful and RevNet couplings: fp32 streams, d = 1 or a power
# of two, an inner coefficient of 0, and u, m and the states in one dense layout (the layout the
# remainders are packed in). Any other step runs op by op. The kernel also keeps max |x_{k+1}|
# (an atomic max on the float's bits, which order non-negative floats as integers; a NaN's bits
# are above every finite value's) in the walk's accumulator, instead of an aminmax per state.
#
# The same pattern covers the other passes over a state: a stage's entry (the grid's exponent
# from the input's max, the input rounded onto the grid with its max), the bf16 adjoint sum of
# a step (rounded to bf16 from the bits, to nearest even as torch rounds: a Triton cast's
# rounding is the backend's, and the interpreter truncates), and the bf16 split and join of a
# stage output (NOTE [ bf16 stage output ] in coupling.py). A kernel Triton cannot compile or
# launch on a device warns once and runs op by op from then on.

_BLOCK = 1024  # elements per Triton program
_SHAPE = operator.attrgetter("shape")


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _mode() -> str:
    """"auto" (fused on CUDA with Triton), "1" (everywhere), "0" (nowhere), or "triton" (the
    Triton kernels on any device: tests run them in Triton's interpreter on the CPU)."""
    return os.environ.get("REVIFY_FUSED_STREAMS", "auto")


def _enabled(t: Tensor) -> bool:
    mode = _mode()
    if mode == "auto":
        return t.device.type == "cuda" and _has_triton()
    return mode != "0"


def _dense_order(ts: list[Tensor]) -> tuple[int, ...] | None:
    """The memory order all of ``ts`` are densely laid out in (one shape, one set of strides),
    or None."""
    strides = set(map(torch.Tensor.stride, ts))
    if len(strides) != 1 or len(set(map(_SHAPE, ts))) != 1:
        return None
    return _order_of(ts[0].shape, strides.pop())


@functools.lru_cache(maxsize=512)
def _order_of(shape: torch.Size, stride: tuple[int, ...]) -> tuple[int, ...] | None:
    """The dimensions of a dense tensor of ``shape`` and ``stride`` from the outermost in
    memory; None when such a tensor is not dense, or empty, or 0-dim."""
    if not shape or 0 in shape:
        return None
    order = _exact._order(torch.empty_strided(shape, stride, device="meta"))
    step = 1  # dense: each dimension's stride the product of the sizes inside it
    for dim in reversed(order):
        if shape[dim] > 1 and stride[dim] != step:
            return None
        step *= shape[dim]
    return order


def _fusable(d: int, inner: float, x: Tensor) -> bool:
    return not inner and x.dtype == torch.float32 and d & (d - 1) == 0 and _enabled(x)


def entry(x: Tensor, dtype: torch.dtype, half: bool) -> tuple[_exact.Grid, Tensor, Tensor,
                                                              Tensor | None] | None:
    """A stage forward's first entry, fused: ``(grid, x_0, max |x_0|, x_0 in bf16 or None)``
    with ``grid = _exact.first_grid(x, dtype)`` and ``x_0`` the input rounded onto it, in two
    kernels (``max |x|``, then the grid's exponent, the rounding, the max and, if ``half``, the
    copy a bf16 unit reads); None where the op does not cover it (then ``_exact.first_grid`` and
    :func:`enter`). The max is non-negative even for a NaN (a NaN's sign bit would sort it below
    every float for the steps' atomic max)."""
    if dtype != torch.float32 or not _enabled(x) or _dense_order([x]) is None:
        return None
    top = torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32)  # NaN if any is
    delta, acc = torch.empty_like(top), torch.empty_like(top)
    x0 = torch.empty_like(x, dtype=torch.float32)
    h = torch.empty_like(x, dtype=torch.bfloat16) if half else None
    _call(_stream_entry, _triton_entry, x, top, delta, x0, acc, h)
    return _exact.Grid(delta), x0, acc, h


def enter(x: Tensor, grid: _exact.Grid, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(x_0, max |x_0|)``: the stage input in the ``dtype`` streams, rounded onto ``grid`` (a
    redone forward's: :func:`entry` makes the first), op by op."""
    x0 = _exact.on_grid(x.to(dtype), grid.delta)
    lo, hi = grid.extrema(x0)
    return x0, torch.maximum(hi, lo.neg()).abs_()


def next_state(
    grid: _exact.Grid, d: int, outer: float, inner: float, u: Tensor, m: Tensor | None,
    x_prev: Tensor, x_cur: Tensor, own_prev: bool, first: bool, top: Tensor, half: bool = False,
) -> tuple[Tensor, _exact.Packed | None, Tensor | None] | None:
    """``(x_{k+1}, packed remainders, x_{k+1} in bf16 if half)`` by the fused op, in
    ``x_prev``'s memory if ``own_prev``, with max |x_{k+1}| folded into ``top``; None when the
    step is not one the op covers (then run ``_exact.rounded`` and ``_exact.next_state``). The
    bf16 copy is what the next unit reads under autocast, made in the same pass. Run without
    grad."""
    if not _fusable(d, inner, x_cur):
        return None
    order = _dense_order([x_cur, x_prev, u] + ([] if m is None else [m]))
    if order is None:
        return None
    out = x_prev if own_prev and not first else torch.empty_like(x_cur)
    n = x_cur.numel()
    packed = None
    if d > 1 and not first:
        packed = torch.empty(_exact.packed_size(n, d), dtype=torch.uint8, device=x_cur.device)
    h = torch.empty_like(x_cur, dtype=torch.bfloat16) if half else None
    _call(_stream_next, _triton_next, u, m, x_prev, x_cur, grid.delta, d, float(outer), first,
          grid.finite_only, out, packed, top, h)
    return out, (None if packed is None else _exact.Packed(packed, order)), h


def prev_state(
    grid: _exact.Grid, d: int, outer: float, inner: float, u: Tensor, m: Tensor | None,
    x_cur: Tensor, x_next: Tensor, packed: _exact.Packed | None, own_next: bool = False,
) -> Tensor:
    """``_exact.prev_state``, by the fused op where it covers the step."""
    order = None
    if _fusable(d, inner, x_cur):
        order = _dense_order([x_cur, x_next, u] + ([] if m is None else [m]))
        if packed is not None and packed.order != order:
            order = None
    if order is None:
        return _exact.prev_state(grid, d, outer, inner, u, m, x_cur, x_next, packed, own_next)
    out = x_next if own_next else torch.empty_like(x_cur)
    data = None if packed is None or d == 1 else packed.data
    _call(_stream_prev, _triton_prev, u, m, x_cur, x_next, data, grid.delta, d, float(outer),
          out)
    return out


def adjoint_sum(
    dx: Tensor | None, terms: list[tuple[Tensor, float]], stream: torch.dtype, out: torch.dtype
) -> Tensor | None:
    """:func:`adjoint_sum_ops` by the fused op when the adjoints are bf16 and the streams fp32
    (one kernel instead of a copy to fp32, a pass per term and a copy back), else None."""
    if (dx is None or not terms or len(terms) > 2 or dx.dtype != out or out != torch.bfloat16
            or stream != torch.float32 or not _enabled(dx)):
        return None
    ts = [t for t, _ in terms]
    if any(t.dtype != out for t in ts) or _dense_order([dx, *ts]) is None:
        return None
    (a, ca), (b, cb) = terms[0], (terms[1] if len(terms) > 1 else (None, 0.0))
    return _call(_adjoint_sum, _triton_adjoint, dx, a, float(ca), b, float(cb))


def adjoint_sum_ops(
    dx: Tensor | None, terms: list[tuple[Tensor, float]], stream: torch.dtype, out: torch.dtype
) -> Tensor | None:
    """``dx + sum(coef * term)`` in ``out``, summed in ``stream``, op by op (coupling's
    ``_adjoint_sum``)."""
    parts = ([(dx, 1.0)] if dx is not None else []) + terms
    if not parts:
        return None
    if len(parts) == 1:
        term, coef = parts[0]
        return term if coef == 1 else term * coef
    (first, coef), *rest = parts
    if first is dx and dx.dtype == stream and coef == 1:
        acc = dx
    else:
        acc = first.to(stream, copy=True)
        if coef != 1:
            acc.mul_(coef)
    for term, coef in rest:
        acc.add_(term, alpha=coef)
    return acc.to(out)


def split_bf16(x: Tensor) -> tuple[Tensor, Tensor]:
    """``_exact.split_bf16``, by the fused op where it runs (one pass instead of ~9)."""
    if not _enabled(x) or _dense_order([x]) is None:
        return _exact.split_bf16(x)
    return _call(_split_bf16, _triton_split, x)


def join_bf16(hi: Tensor, rest: Tensor) -> Tensor:
    """``_exact.join_bf16``, by the fused op where it runs."""
    if not _enabled(hi) or _dense_order([hi, rest]) is None:
        return _exact.join_bf16(hi, rest)
    return _call(_join_bf16, _triton_join, hi, rest)


# ---- the ops, and their kernel op by op (every device but CUDA) ---------------------------


def _flat(t: Tensor | None) -> Tensor | None:
    """A flat view of ``t`` in its memory order (dense: :func:`_dense_order` held)."""
    return None if t is None else t.permute(_exact._order(t)).reshape(-1)


def _stream_next_ops(
    u: Tensor, m: Tensor | None, x_prev: Tensor, x_cur: Tensor, delta: Tensor, d: int,
    outer: float, first: bool, finite_only: bool, out: Tensor, packed: Tensor | None,
    top: Tensor, half: Tensor | None,
) -> None:
    """One exact forward step into ``out`` (may be ``x_prev``), its remainders into ``packed``,
    max |x_{k+1}| into ``top``, ``x_{k+1}`` in bf16 into ``half`` (NOTE [ Fused streams ]); op
    by op, on whole packing groups."""
    grid = _exact.Grid(delta, finite_only)
    uf, mf, pf, cf, of, hf = map(_flat, (u, m, x_prev, x_cur, out, half))
    per, nbytes = _exact.group(d)
    for sl in _exact.chunks(uf.numel()):
        t = _exact.rounded(uf[sl], None if mf is None else mf[sl], cf[sl], 0.0, grid, own=False)
        x, p = _exact.next_state(grid, d, outer, t, pf[sl], cf[sl], own_prev=False, first=first)
        of[sl].copy_(x)  # x_prev's elements here are read: out may be x_prev
        if p is not None:
            packed[_exact.packed_range(sl, per, nbytes)].copy_(p.data)
        if hf is not None:
            hf[sl].copy_(x)
        top.copy_(torch.maximum(top, torch.stack(grid.extrema(x)).abs().max()))


def _stream_prev_ops(
    u: Tensor, m: Tensor | None, x_cur: Tensor, x_next: Tensor, packed: Tensor | None,
    delta: Tensor, d: int, outer: float, out: Tensor,
) -> None:
    """The inverse step into ``out`` (may be ``x_next``); op by op, on whole packing groups."""
    grid = _exact.Grid(delta)
    uf, mf, cf, nf, of = map(_flat, (u, m, x_cur, x_next, out))
    per, nbytes = _exact.group(d)
    for sl in _exact.chunks(uf.numel()):
        rem = None
        if packed is not None:
            rem = _exact.Packed(packed[_exact.packed_range(sl, per, nbytes)], (0,))
        x = _exact.prev_state(grid, d, outer, 0.0, uf[sl], None if mf is None else mf[sl],
                              cf[sl], nf[sl], rem)
        of[sl].copy_(x)


def _adjoint_sum_ops(dx: Tensor, a: Tensor, ca: float, b: Tensor | None, cb: float) -> Tensor:
    """``dx + ca * a (+ cb * b)`` summed in fp32, in ``dx``'s dtype; op by op."""
    terms = [(a, ca)] + ([] if b is None else [(b, cb)])
    return adjoint_sum_ops(dx, terms, torch.float32, dx.dtype)


def _stream_entry_ops(x: Tensor, top: Tensor, delta: Tensor, x0: Tensor, acc: Tensor,
                      half: Tensor | None) -> None:
    """A stage input's grid from ``top = max |x|``, the input as fp32 on it, its max |.| and
    its bf16 copy; op by op."""
    delta.copy_(_exact._step(top, _exact.HEADROOM_BITS))
    on, m = enter(x, _exact.Grid(delta), torch.float32)
    x0.copy_(on)
    acc.copy_(m)
    if half is not None:
        half.copy_(on)


# ---- the Triton kernels (CUDA; Triton's interpreter runs them on the CPU in tests) --------


def _kernels():  # noqa: ANN202 - Triton's JIT functions
    from . import _stream_triton  # imports triton: only where a kernel runs

    k = _stream_triton
    return (k.next_kernel, k.prev_kernel, k.adjoint_kernel, k.split_kernel, k.join_kernel,
            k.entry_kernel)


def _launch_shape(d: int, n: int) -> tuple[dict[str, int], tuple[int]]:
    per, nbytes = _exact.group(d)
    groups = _BLOCK // per
    meta = dict(BITS=_exact.bit_width(d), PER=per, NBYTES=nbytes, GROUPS=groups)
    return meta, (-(-n // (groups * per)),)


def _triton_next(u, m, x_prev, x_cur, delta, d, outer, first, finite_only, out, packed, top,
                 half):
    next_kernel = _kernels()[0]
    n = x_cur.numel()
    meta, grid = _launch_shape(d, n)
    uf, mf, pf, cf, of = map(_flat, (u, m, x_prev, x_cur, out))
    next_kernel[grid](
        uf, uf if mf is None else mf, pf, cf, delta, of, top if packed is None else packed,
        top.view(torch.int32), of if half is None else _flat(half).view(torch.int16), n,
        outer, D=d, HAS_M=mf is not None, FIRST=first, HAS_OUTER=outer != 0,
        FINITE=finite_only, HALF=half is not None, **meta,
    )


def _triton_prev(u, m, x_cur, x_next, packed, delta, d, outer, out):
    prev_kernel = _kernels()[1]
    n = x_cur.numel()
    meta, grid = _launch_shape(d, n)
    uf, mf, cf, nf, of = map(_flat, (u, m, x_cur, x_next, out))
    prev_kernel[grid](
        uf, uf if mf is None else mf, cf, nf, uf if packed is None else packed, delta, of, n,
        outer, D=d, HAS_M=mf is not None, HAS_PACKED=packed is not None, HAS_OUTER=outer != 0,
        **meta,
    )


def _triton_adjoint(dx, a, ca, b, cb):
    out = torch.empty_like(dx)
    _kernels()[2][(-(-dx.numel() // _BLOCK),)](
        _flat(dx), _flat(a), _flat(a if b is None else b), _flat(out.view(torch.int16)),
        dx.numel(), ca, cb, HAS_B=b is not None, BLOCK=_BLOCK,
    )
    return out


def _triton_split(x):
    hi, rest = _split_outputs(x)
    _kernels()[3][(-(-x.numel() // _BLOCK),)](
        _flat(x).view(torch.int32), _flat(hi).view(torch.int16), _flat(rest), x.numel(),
        BLOCK=_BLOCK,
    )
    return hi, rest


def _triton_join(hi, rest):
    out = _join_output(hi, rest)
    _kernels()[4][(-(-hi.numel() // _BLOCK),)](
        _flat(hi).view(torch.int16), _flat(rest), _flat(out).view(torch.int32), hi.numel(),
        BLOCK=_BLOCK,
    )
    return out


def _triton_entry(x, top, delta, x0, acc, half):
    _kernels()[5][(-(-x.numel() // _BLOCK),)](
        _flat(x), top, delta, _flat(x0), acc, _flat(x0 if half is None else half.view(torch.int16)),
        x.numel(), _exact.HEADROOM_BITS - _exact.GRID_BITS, _exact._FLOOR, HALF=half is not None,
        BLOCK=_BLOCK,
    )


_FAILED: list[str] = []  # why the Triton kernels could not run, once they could not


def _with_fallback(triton_impl: Any, ops_impl: Any) -> Any:
    """``triton_impl``, or ``ops_impl`` (the same bits) with one warning once Triton could not
    compile or launch a kernel here."""

    def kernel(*args: Any) -> Any:
        if not _FAILED:
            try:
                return triton_impl(*args)
            except Exception as e:  # noqa: BLE001 - any compile or launch failure
                _FAILED.append(f"{type(e).__name__}: {e}")
                warnings.warn(
                    "revify: the fused stream kernels (Triton) failed on this device, so the "
                    f"exact streams run op by op (the same values, slower): {_FAILED[0][:300]}",
                    RuntimeWarning, stacklevel=2,
                )
        return ops_impl(*args)

    return kernel


def _call(op: Any, triton_impl: Any, *args: Any) -> Any:
    """``op(*args)``; its Triton kernel on any device under REVIFY_FUSED_STREAMS=triton."""
    return (triton_impl if _mode() == "triton" else op)(*args)


# ---- registration: each op's kernel op by op (every device), its Triton kernel (CUDA), and
# what it makes (fake and meta tensors: the audit) -----------------------------------------


def _op(name: str, ops_impl: Any, triton_impl: Any, fake: Any, mutates_args: tuple = ()) -> Any:
    op = torch.library.custom_op(f"revify::{name}", mutates_args=mutates_args)(ops_impl)
    op.register_fake(fake)
    op.register_kernel("cuda")(_with_fallback(triton_impl, ops_impl))
    return op


def _mutates_only(*args: Any) -> None:
    return None


def _split_outputs(x: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.int16)


def _join_output(hi: Tensor, rest: Tensor) -> Tensor:
    return torch.empty_like(hi, dtype=torch.float32)


_stream_next = _op("stream_next", _stream_next_ops, _triton_next, _mutates_only,
                   ("out", "packed", "top", "half"))
_stream_prev = _op("stream_prev", _stream_prev_ops, _triton_prev, _mutates_only, ("out",))
_stream_entry = _op("stream_entry", _stream_entry_ops, _triton_entry, _mutates_only,
                    ("delta", "x0", "acc", "half"))
_split_bf16 = _op("split_bf16", _exact.split_bf16, _triton_split, _split_outputs)
_join_bf16 = _op("join_bf16", _exact.join_bf16, _triton_join, _join_output)
_adjoint_sum = _op("adjoint_sum", _adjoint_sum_ops, _triton_adjoint,
                   lambda dx, a, ca, b, cb: torch.empty_like(dx))
