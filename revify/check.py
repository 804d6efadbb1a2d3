"""``revify.check``: is a converted model's backward as accurate as ordinary autograd?

For one training step on the given input it measures, per reversible stage:

- the reconstruction error of the stage input, rebuilt by the backward from the stage's last
  two states, against the true input;
- the gradient error of revify's backward against a float64 truth (ordinary autograd of the
  same converted function in float64), divided by the error of ordinary autograd at the
  model's own precision. A ratio near 1 means reversibility added no error (DESIGN.md §4).
  The same ratio per unit (over the unit's parameters) gives the stage's worst unit, which a
  ratio over the whole stage can average away.

The model's parameters, buffers (BatchNorm statistics) and RNG state are left as they were.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._compile import eager_units
from ._mode import _original, plain_autograd
from ._stacks import refuse_stacks
from ._trace import training_kept
from .convert import is_converted, stages

__all__ = ["check", "CheckReport", "StageCheck"]


@dataclass
class StageCheck:
    """Figures for one reversible stage (``nan`` where the stage has no trainable parameter)."""

    name: str
    units: int
    reconstruction_error: float  # max|x_rec - x| / max|x|
    grad_error: float  # ||g_revify - g64|| / ||g64|| over the stage's parameters
    plain_grad_error: float  # same for ordinary autograd at the model's precision
    ratio: float  # grad_error / plain_grad_error (nan where plain is exact: float64)
    # The unit whose parameters have the largest ratio of the same two errors: a stage ratio
    # near 1 can hide one unit far off (ConvNeXt's unit 0 at 2.5-16x read 1.06-1.09 as a stage).
    worst_unit: str = ""
    worst_unit_ratio: float = math.nan
    worst_unit_grad_error: float = math.nan
    worst_unit_plain_grad_error: float = math.nan


@dataclass
class CheckReport:
    """Result of :func:`check`; ``stages`` has one row per reversible stage, in order."""

    precision: str
    output_rel_error: float = math.nan  # ||y - y_original|| / ||y_original||, eval mode
    top1_agreement: float = math.nan  # share of samples whose argmax matches the original's
    stages: list[StageCheck] = field(default_factory=list)
    grad_error: float = math.nan  # over every parameter and the input
    plain_grad_error: float = math.nan
    ratio: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"revify.check ({self.precision}): vs original: output error "
            f"{self.output_rel_error:.3g}, top-1 agreement {self.top1_agreement:.2%}",
            f"  gradient error {self.grad_error:.3g}, plain autograd {self.plain_grad_error:.3g},"
            f" ratio {_fmt(self.ratio)}",
        ]
        if self.plain_grad_error == 0:
            lines.append("  (ordinary autograd at this precision is the float64 truth itself: "
                         "no ratio; read the gradient errors)")
        for s in self.stages:
            lines.append(
                f"  {s.name:<24} units={s.units:<3} reconstruction={s.reconstruction_error:.2e} "
                f"grad={s.grad_error:.3g} plain={s.plain_grad_error:.3g} ratio={_fmt(s.ratio)} "
                f"worst unit={s.worst_unit or '-'} ratio={_fmt(s.worst_unit_ratio)}"
            )
        return "\n".join(lines)


def _rel(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> float:
    """``||a - b|| / ||b||`` over the pairs where the reference ``b`` exists."""
    num = den = 0.0
    for x, y in zip(a, b, strict=True):
        if y is None:
            continue
        y64 = y.double()
        x64 = torch.zeros_like(y64) if x is None else x.double()
        num += float((x64 - y64).pow(2).sum())
        den += float(y64.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.nan


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Put every buffer back afterwards (each step updates BatchNorm statistics)."""
    saved = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])


def _step(
    model: nn.Module, x: Tensor, weight: Tensor, params: list[nn.Parameter],
    autocast: torch.dtype | None, seed: int,
) -> list[Tensor | None]:
    """Gradients of a fixed random projection of the output, input gradient last."""
    x = x.detach().requires_grad_(True)
    with torch.random.fork_rng(devices=[]), _restored(model):
        torch.manual_seed(seed)
        ctx = torch.autocast(x.device.type, dtype=autocast) if autocast else nullcontext()
        with ctx:
            y = model(x)
        y = y[0] if isinstance(y, (tuple, list)) else y
        dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
        loss = (y.to(dtype) * weight.to(y.device, dtype).view_as(y)).sum()
        grads = torch.autograd.grad(loss, [*params, x], allow_unused=True)
    return list(grads)


def check(
    model: nn.Module,
    example_input: Tensor,
    *,
    autocast: torch.dtype | None = None,
    seed: int = 0,
    gradients: bool = True,
) -> CheckReport:
    """Measure reconstruction and gradient errors of a converted model on ``example_input``.

    Args:
        model: a model converted with :func:`revify.convert`, in the mode you train it in.
        example_input: a floating-point input batch (a few samples suffice).
        autocast: e.g. ``torch.bfloat16`` to check under autocast on the input's device.
        seed: RNG seed, so dropout and DropPath draw the same masks in every run.
        gradients: also measure gradient and reconstruction errors (the costly part).

    Fidelity to the original network (``output_rel_error``, ``top1_agreement``) is measured in
    eval mode without grad: the converted forward against the original code of the same model.

    Runs three steps: float64 ordinary autograd on a deep copy (the truth), revify's backward
    and ordinary autograd at the model's precision. Costs about three training steps and a
    float64 copy of the model. Units compiled by :func:`revify.compile_units` are checked
    eagerly: a compiled float64 copy would draw other dropout numbers than the model, so no
    truth would be comparable (their compiled gradients are ordinary autograd's of the compiled
    function, tests/test_regional_compile.py).
    """
    with eager_units(model):
        return _check(model, example_input, autocast, seed, gradients)


def _check(model: nn.Module, example_input: Tensor, autocast: torch.dtype | None, seed: int,
           gradients: bool) -> CheckReport:
    if not is_converted(model):
        raise ValueError("revify.check: model is not converted; call revify.convert(model) first")
    refuse_stacks("revify.check", model)
    if not isinstance(example_input, Tensor):
        raise TypeError(
            f"revify.check: example_input must be a tensor, got {type(example_input).__name__}"
        )
    if not example_input.is_floating_point():
        raise TypeError(
            f"revify.check: example_input must be floating point, got {example_input.dtype}"
        )
    precision = f"autocast {autocast}" if autocast else str(example_input.dtype)
    report = CheckReport(precision)
    report.output_rel_error, report.top1_agreement = _fidelity(model, example_input)
    if not gradients:
        return report
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): i for i, p in enumerate(params)}
    with torch.no_grad(), _restored(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model(example_input)
    out = out[0] if isinstance(out, (tuple, list)) else out
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)

    ref = copy.deepcopy(model).double()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    with plain_autograd():
        truth = _step(ref, example_input.double(), weight, ref_params, None, seed)
    del ref

    stage_list = stages(model)
    for st in stage_list:
        st.record_input = True
    try:
        rev = _step(model, example_input, weight, params, autocast, seed)
    finally:
        for st in stage_list:
            st.record_input = False
    with plain_autograd():
        plain = _step(model, example_input, weight, params, autocast, seed)

    report.grad_error = _rel(rev, truth)
    report.plain_grad_error = _rel(plain, truth)
    report.ratio = _ratio(report.grad_error, report.plain_grad_error)

    def errors(tensors: Sequence[Tensor]) -> tuple[float, float]:
        idx = [names[id(t)] for t in tensors if id(t) in names]
        return (_rel([rev[i] for i in idx], [truth[i] for i in idx]),
                _rel([plain[i] for i in idx], [truth[i] for i in idx]))

    for st in stage_list:
        g_err, p_err = errors(st.tensors())
        rec = st.last_reconstruction_error
        row = StageCheck(
            st.name, len(st.units), math.nan if rec is None else float(rec),
            g_err, p_err, _ratio(g_err, p_err),
        )
        for unit, tensors in zip(st.units, st.unit_tensors(), strict=True):
            u_err, u_plain = errors(tensors)
            u_ratio = _ratio(u_err, u_plain)  # nan for a unit without trainable parameters
            if math.isnan(u_ratio):
                continue
            if math.isnan(row.worst_unit_ratio) or u_ratio > row.worst_unit_ratio:
                row.worst_unit, row.worst_unit_ratio = unit.name, u_ratio
                row.worst_unit_grad_error, row.worst_unit_plain_grad_error = u_err, u_plain
        report.stages.append(row)
    return report


def _fidelity(model: nn.Module, x: Tensor) -> tuple[float, float]:
    """Relative output error and top-1 agreement of the converted model against its original
    code (classifier outputs ``(B, classes)``; agreement is ``nan`` for other shapes)."""
    with training_kept(model), torch.no_grad():
        model.eval()
        y = model(x)
        with _original():
            y0 = model(x)
    y = y[0] if isinstance(y, (tuple, list)) else y
    y0 = y0[0] if isinstance(y0, (tuple, list)) else y0
    y, y0 = y.double(), y0.double()
    rel = float((y - y0).norm() / y0.norm().clamp_min(1e-300))
    agree = float((y.argmax(-1) == y0.argmax(-1)).double().mean()) if y.ndim == 2 else math.nan
    return rel, agree


def _ratio(a: float, b: float) -> float:
    """``a / b``; nan where ordinary autograd is exact (``b == 0``: a float64 model, whose
    ordinary autograd is the truth itself), so no ratio says how much error revify added."""
    if b == 0:
        return 1.0 if a == 0 else math.nan
    return a / b


def _fmt(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{ratio:.3g}"


class _Probe:
    """Stands in for a stage unit and records ``||R(h)|| / ||h||`` of each ``raw`` call (so
    use it for forward passes only: a reversible backward calls ``raw`` again)."""

    def __init__(self, unit: Any, ratios: list[float]) -> None:
        self._unit, self._ratios = unit, ratios

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unit, name)

    def raw(self, h: Tensor, *side: Any) -> Tensor:
        u = self._unit.raw(h, *side)
        with torch.no_grad():
            r = u - h if self._unit.subtract_input else u
            self._ratios.append(float(r.norm() / h.norm().clamp_min(1e-300)))
        return u


@contextmanager
def _branch_ratios(model: nn.Module) -> Iterator[list[float]]:
    """Record ``||R(h)|| / ||h||`` for every unit call of the forward passes run inside.

    A gradient check is only as strong as the residual branches are large: with branches near
    zero (timm's ``zero_init_last=True``) any coupling computes nearly the identity.
    """
    ratios: list[float] = []
    saved = [(st, list(st.units)) for st in stages(model)]
    try:
        for st, units in saved:
            st.units = [_Probe(u, ratios) for u in units]
        yield ratios
    finally:
        for st, units in saved:
            st.units = units


def _peak_live_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live CPU tensor bytes while ``fn()`` runs, above what was live before.

    From ``torch.profiler``'s allocation events: the CPU counterpart of
    ``torch.cuda.max_memory_allocated``, exact and repeatable (unlike the process RSS).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, n_bytes in events:
        live += n_bytes
        peak = max(peak, live)
    return peak
