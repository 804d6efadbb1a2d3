"""Fused exact stream steps (NOTE [ Fused streams ] in revify/_fused.py): the op, its Triton
kernels (run in Triton's interpreter on the CPU) and the op-by-op arithmetic give the same bits,
and a converted model computes the same outputs and gradients whichever runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import timm_model

import revify
from revify import _exact, _fused


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same_bf16(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, but for NaNs, which are NaN in both (a NaN's bf16 bits are the backend's:
    torch's CPU cast gives 0xFFFF, CUDA's 0x7FFF, the kernels 0x7FC0)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int16),
                                                       b[~nan].view(torch.int16))


def _case(d, shape, has_m, first, outer, finite=False, channels_last=False,
          u_dtype=torch.bfloat16, seed=0, device="cpu"):
    """A forward step and its inverse on random grid states, fused and op by op."""
    g = torch.Generator().manual_seed(seed)

    def rand(scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device)

    grid = _exact.first_grid(rand(3), torch.float32, finite)
    x_prev, x_cur = (_exact.on_grid(rand(3), grid.delta) for _ in range(2))
    if first:
        x_prev = x_cur
    u = rand().to(u_dtype)
    m = rand().to(u_dtype) if has_m else None
    if channels_last:
        cl = torch.channels_last
        x_prev, x_cur, u, m = (None if t is None else t.contiguous(memory_format=cl)
                               for t in (x_prev, x_cur, u, m))
    if finite:
        u.view(-1)[3] = float("nan")  # a redo on finite maxima: the NaN stays in its element
    top = torch.zeros((), device=x_cur.device)  # the walk's running max |state|
    fused = _fused.next_state(grid, d, outer, 0.0, u, m, x_prev.clone(), x_cur, True, first,
                              top, half=True)
    assert fused is not None, "a step the op covers"
    x_next, packed, half = fused
    # the next unit's bf16 input, made in the same pass: torch's rounding, bit for bit
    assert half.stride() == x_next.stride()
    assert _same_bf16(half, x_next.bfloat16())
    back = _fused.prev_state(grid, d, outer, 0.0, u, m, x_cur, x_next.clone(), packed, True)
    t = _exact.rounded(u, m, x_cur, 0.0, grid, own=False)
    ref_next, ref_packed = _exact.next_state(grid, d, outer, t, x_prev.clone(), x_cur,
                                             own_prev=True, first=first)
    ref_back = _exact.prev_state(grid, d, outer, 0.0, u, m, x_cur, ref_next, ref_packed)
    ref_top = _exact.top([grid.extrema(ref_next)])
    assert torch.equal(_bits(x_next), _bits(ref_next))
    assert (packed is None) == (ref_packed is None)
    if packed is not None:
        assert torch.equal(packed.data, ref_packed.data) and packed.order == ref_packed.order
    assert torch.equal(_bits(back), _bits(ref_back))
    assert torch.equal(top, ref_top) or (top.isnan() and ref_top.isnan())
    if not finite:
        assert torch.equal(back, x_prev)  # the inverse is exact


CASES = [
    *[(d, (3, 5, 7, 11), has_m, False, 1.0) for d in (1, 2, 16, 64, 256) for has_m in (0, 1)],
    (64, (3, 5, 7, 11), True, True, 1.0),  # the first step keeps no remainders
    (64, (3, 5, 7, 11), True, False, 0.0),  # a unit ending in an activation: outer 0
    (64, (2, 8, 4, 4), True, False, 1.0, False, True),  # channels-last states
    (64, (1000,), False, False, 2.0, False, False, torch.float32),
    (64, (1000,), True, False, 1.0, True),  # finite maxima only
    (64, (3, 3000), True, False, 1.0),  # more than one program (1024 elements each)
]


@pytest.mark.parametrize("case", CASES)
def test_op_gives_the_bits_of_the_op_by_op_step(case, monkeypatch):
    monkeypatch.setenv("REVIFY_FUSED_STREAMS", "1")
    _case(*case)


def test_op_covers_only_its_steps(monkeypatch):
    """Other steps return None (the caller runs them op by op); off by default on the CPU."""
    x = torch.zeros(2, 4, 3, 3)
    grid = _exact.first_grid(x + 1, torch.float32)
    top = torch.zeros((), device=x.device)
    args = (x, None, x.clone(), x, True, False, top)
    assert _fused.next_state(grid, 64, 1.0, 0.0, *args) is None  # CPU, auto: op by op
    monkeypatch.setenv("REVIFY_FUSED_STREAMS", "1")
    assert _fused.next_state(grid, 64, 1.0, 0.0, *args) is not None
    assert _fused.next_state(grid, 3, 1.0, 0.0, *args) is None  # d not a power of two
    assert _fused.next_state(grid, 64, 0.0, 0.5, *args) is None  # an inner coefficient
    cl = x.contiguous(memory_format=torch.channels_last) + 0
    assert _fused.next_state(grid, 64, 1.0, 0.0, cl, None, x.clone(), x, True, False,
                             top) is None  # layouts differ
    d = x.double()
    assert _fused.next_state(_exact.first_grid(d + 1, torch.float64), 64, 1.0, 0.0, d, None,
                             d.clone(), d, True, False, top) is None  # fp64 streams


def _adjoint_case(device="cpu"):
    """The adjoint sum by the fused op: the bits of the op-by-op sum (ties, NaN, inf, overflow
    to inf included)."""
    g = torch.Generator().manual_seed(0)
    dx, a, b = (torch.randn(5000, generator=g).bfloat16() for _ in range(3))
    dx[:4] = torch.tensor([float("nan"), float("inf"), 3.0e38, 1.0 + 2**-8])  # a tie: even
    a[:4] = torch.tensor([1.0, 1.0, 3.0e38, 0.0])
    dx, a, b = dx.to(device), a.to(device), b.to(device)
    for terms in ([(a, 1 / 64)], [(a, 1 / 64), (b, 63 / 64 - 1)], [(a, 1.0), (b, 0.5)]):
        fused = _fused.adjoint_sum(dx, terms, torch.float32, torch.bfloat16)
        ref = _fused.adjoint_sum_ops(dx, terms, torch.float32, torch.bfloat16)
        assert fused is not None and fused.dtype == torch.bfloat16
        same = (fused.view(torch.int16) == ref.view(torch.int16)) | (fused.isnan() & ref.isnan())
        assert bool(same.all())  # NaN payloads aside


def _split_case(device="cpu"):
    """The bf16 split and join of a stage output by the fused ops: the bits of the op-by-op
    ones, and the join gives the split state back (ties, NaN payloads, inf, negatives)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, 11, generator=g) * 100
    special = torch.tensor([0x7FFFFFFF, -1, 0x7F800000, 0x3F808000, -0x40808000, 0x7FC00001],
                           dtype=torch.int32)  # NaNs, inf, exact ties of both signs
    x.view(-1)[: special.numel()] = special.view(torch.float32)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    hi, rest = _fused.split_bf16(x)
    ref_hi, ref_rest = _exact.split_bf16(x)
    assert hi.stride() == x.stride()
    assert torch.equal(hi.view(torch.int16), ref_hi.view(torch.int16))
    assert torch.equal(rest, ref_rest)
    back = _fused.join_bf16(hi, rest)
    assert torch.equal(back.view(torch.int32), _exact.join_bf16(ref_hi, ref_rest).view(torch.int32))
    finite = torch.isfinite(x) | torch.isinf(x)
    assert torch.equal(back[finite], x[finite]) and bool(back[~finite].isnan().all())


def _enter_case(device="cpu"):
    """A stage's first entry by the fused ops (max |x|, then the grid's exponent, the rounding
    of the input onto it, max |x_0| and the bf16 copy): the bits of the op-by-op entry, for bf16
    and fp32 inputs, channels-last, an all-zero input, tiny and huge values, NaN and inf."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, 5, 7, generator=g)
    inputs = [base * 3, base * 1e-30, base * 1e30, torch.zeros(2, 6, 5, 7), -base.abs() * 1e-3]
    odd = base.clone()
    odd.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    inputs.append(odd)
    for x in inputs:
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True):
                v = x.to(device, dtype)
                if cl:
                    v = v.contiguous(memory_format=torch.channels_last)
                for half in (False, True):
                    entry = _fused.entry(v, torch.float32, half)
                    assert entry is not None, "an entry the op covers"
                    grid, x0, top, h = entry
                    ref = _exact.first_grid(v, torch.float32)
                    r0, rtop = _fused.enter(v, ref, torch.float32)
                    assert torch.equal(grid.delta, ref.delta) and not grid.finite_only
                    assert x0.stride() == v.stride()
                    assert torch.equal(x0.view(torch.int32), r0.view(torch.int32))
                    assert torch.equal(top, rtop) or (top.isnan() and rtop.isnan())
                    assert not bool(top.signbit())
                    assert (h is None) == (not half)
                    if half:
                        assert h.stride() == v.stride()
                        assert _same_bf16(h, r0.bfloat16())


def test_enter_ops_give_the_bits_of_the_op_by_op_entry(monkeypatch):
    monkeypatch.setenv("REVIFY_FUSED_STREAMS", "1")
    _enter_case()


def test_split_ops_give_the_bits_of_the_op_by_op_split(monkeypatch):
    monkeypatch.setenv("REVIFY_FUSED_STREAMS", "1")
    _split_case()


def test_adjoint_op_gives_the_bits_of_the_op_by_op_sum(monkeypatch):
    monkeypatch.setenv("REVIFY_FUSED_STREAMS", "1")
    _adjoint_case()
    x = torch.zeros(4)
    assert _fused.adjoint_sum(x, [(x, 1.0)], torch.float32, torch.float32) is None  # fp32: in dx


def _step(model, x, seed=1):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
        y = model(x.float())
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return y, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _counting(monkeypatch) -> list[int]:
    """Count the steps the op runs."""
    calls: list[int] = []
    next_state = _fused.next_state

    def counted(*args, **kwargs):
        out = next_state(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_fused, "next_state", counted)
    return calls


def test_converted_model_same_bits_fused_or_not(monkeypatch):
    """Default (faithful, exact) conversion, BatchNorm in train mode, DropPath, bf16 autocast and
    fp32: outputs and every gradient equal bit for bit with the op and op by op."""
    calls = _counting(monkeypatch)
    model = timm_model("resnet50", drop_path_rate=0.3).train()
    revify.convert(model, torch.zeros(2, 3, 32, 32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 3, 32, 32).to(dtype)
        runs = {}
        for mode in ("0", "1"):
            monkeypatch.setenv("REVIFY_FUSED_STREAMS", mode)
            model.load_state_dict(state)
            runs[mode] = _step(model, x)
        (y0, g0), (y1, g1) = runs["0"], runs["1"]
        assert sum(calls) == 12 and not all(calls)  # 12 steps fused (one forward), the rest not
        calls.clear()
        assert torch.equal(y0, y1)
        assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


_INTERPRETED = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_fused as T
for case in T.CASES:
    T._case(*case)
T._adjoint_case()
T._split_case()
T._enter_case()
import revify
from conftest import timm_model
from revify import _fused
calls = []
triton_next = _fused._triton_next
_fused._triton_next = lambda *a: calls.append(1) or triton_next(*a)
model = timm_model("resnet50", drop_path_rate=0.3).train()
revify.convert(model, torch.zeros(2, 3, 32, 32))
state = {{k: v.clone() for k, v in model.state_dict().items()}}
import os
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(2, 3, 32, 32).to(dtype)
    runs = {{}}
    for mode in ("0", "triton"):
        os.environ["REVIFY_FUSED_STREAMS"] = mode
        model.load_state_dict(state)
        runs[mode] = T._step(model, x)
    (y0, g0), (y1, g1) = runs["0"], runs["triton"]
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert len(calls) == 12, calls  # every step of the stages, by the kernel
    calls.clear()
print("OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_kernels_give_the_same_bits():
    """The CUDA kernels, run by Triton's interpreter on the CPU: every step case above, and a
    converted model's outputs and gradients, bit for bit those of the op-by-op arithmetic."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1", REVIFY_FUSED_STREAMS="triton")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED.format(tests=tests))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]


def test_kernel_that_cannot_run_falls_back_with_a_warning(monkeypatch):
    """A Triton compile or launch failure (an unsupported GPU) warns once and runs the op by
    op kernel, which gives the same values."""
    monkeypatch.setattr(_fused, "_FAILED", [])

    def broken(*args):
        raise RuntimeError("no kernel for this device")

    kernel = _fused._with_fallback(broken, _exact._step)
    top = torch.tensor(3.0)
    with pytest.warns(RuntimeWarning, match="no kernel for this device"):
        first = kernel(top, 8)
    second = kernel(top, 8)  # no second warning, no second try
    assert torch.equal(first, _exact._step(top, 8)) and torch.equal(second, first)
    assert len(_fused._FAILED) == 1
