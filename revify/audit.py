"""``revify.audit``: the bytes a training step keeps for backward, block by block, before and
after conversion, measured on fake tensors.

NOTE [ Audit counting ]
The audit runs a training step of the model twice in train mode: once as it was before
``convert`` (``_mode._original()``) and once converted. Both passes run under ``FakeTensorMode``
with every parameter and buffer swapped for a fake copy for the whole step
(``_simulate.fake_parameters``), so no activation is allocated and no state of the real model
changes (a plain forward in train mode would increment BatchNorm's ``num_batches_tracked``).
Every tensor autograd saves for backward in the forward goes through ``saved_tensors_hooks``; it
is counted once per storage (``untyped_storage()._cdata``, with a reference kept so that the
address is not reused during the forward), leaving out the storages of parameters and buffers,
which are no activations. This is the counting of DESIGN.md §4.

Each counted storage goes to the innermost block of ``plan.blocks`` whose module is running, else
to the plan step running now (``_mode.current_step``: what a reversible stage or a checkpointed
segment stores itself, its streams or its inputs), else to ``"other"`` (e.g. the classifier head
outside the trunk).

NOTE [ Audit peak ]
Each pass then runs the backward as well (of ``sum(outputs)``), so the step's peak comes from the
code that really runs, recomputes and rebuilt states included, not from a formula. Every storage
an op creates during forward and backward is counted while Python holds it (``_simulate``); the
parameters start with zero gradients, as in every step after the first, so the peak is above
weights, buffers and gradients, the counterpart of ``torch.cuda.max_memory_allocated`` measured
from a step's start. Kernel workspaces (oneDNN, cuDNN), allocator rounding and fragmentation are
not seen. On ResNet-50 at 224x224, batch 8, the CPU peak of live tensor bytes was 202 MiB
against 178 simulated (the difference is one contiguous copy inside oneDNN's convolution
backward), and 666 against 659 unconverted; at 32x32 oneDNN's weight-gradient workspaces, up to
8x the largest weight, dominate. When weights outweigh activations (small inputs) a unit's
parameter gradients, which its step returns together, can lift the converted peak above the
original's: ResNet-50 at 64x64, batch 2, 26.5 against 23.5 MB simulated.

Known limitations:
- Tensors that an autograd Function keeps on ``ctx`` attributes instead of ``save_for_backward``
  are not seen (DESIGN.md §4: measure the RSS of a fresh process as well).
- The step peak is a simulation (NOTE [ Audit peak ]), not a measurement.
- Code that branches on tensor values cannot run on fake tensors.
- Models taking one input tensor only (the trunk method's one required argument).
- The original code runs no plan step, so in the "before" pass the ops of an inline unit
  (``x = x + f(x)`` written in a forward) that sit outside any module count as ``"other"``.
- A model ``convert`` leaves alone is reported by its direct children, with before == after.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from . import _mode
from ._plan import Block, Plan, ReportLine
from ._replay import own_hook
from ._simulate import LiveBytes, fake_model
from ._stacks import refuse_stacks
from ._trace import training_kept
from .convert import convert
from .coupling import ReversibleStage

__all__ = ["audit", "AuditReport", "AuditRow"]

_PLAN = "_revify_plan"
_OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2, "none": 0}  # state tensors per parameter
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_OTHER = "other"

# An attribution key: ("block", path), ("step", step name) or ("other", "").
_Key = tuple[str, str]


# ----------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class AuditRow:
    """Bytes saved for backward by one block (or by a plan step itself), before and after.

    ``kind`` is ``"block"`` for a block of ``plan.blocks``, ``"step"`` for what a stage or
    segment stores itself (a stage's streams, a checkpointed segment's inputs) and ``"other"``
    for everything outside the trunk's blocks and steps.
    """

    name: str
    treatment: str  # "reversible", "checkpointed" or "unchanged"
    output_shape: tuple[int, ...] | None  # (B, C, H, W) of the block's output, if a tensor
    bytes_before: int
    bytes_after: int
    step: str | None = None  # plan step (stage or segment) that runs it
    kind: str = "block"
    pattern: str = ""  # residual pattern matched (reversible units) or role (stem, transition)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["output_shape"] = list(self.output_shape) if self.output_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditRow:
        shape = d.get("output_shape")
        kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kwargs["output_shape"] = tuple(shape) if shape is not None else None
        return cls(**kwargs)


@dataclass
class AuditReport:
    """Result of :func:`audit`: bytes as data (``to_dict``/``to_json``) and displays
    (``to_markdown``, ``print_rich``/``__rich__``, ``plot``).

    ``rows`` hold the bytes saved for backward per block; the other byte counts describe the
    model's persistent memory for a training step. All sizes are in bytes.
    """

    model: str
    input_shape: tuple[int, ...]  # (B, C, H, W) of the audited input
    dtype: str
    rows: list[AuditRow]
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int  # parameters that require grad
    optimizer: str  # "sgd" (with momentum), "adam", "adamw" or "none"
    optimizer_bytes: int  # state tensors per parameter requiring grad: 1, 2, 2 or 0
    # Peak bytes of one simulated training step (forward + backward) above weights, buffers and
    # gradients: saved activations plus what the backward allocates (NOTE [ Audit peak ]).
    step_peak_before: int
    step_peak_after: int
    report: list[ReportLine] = field(default_factory=list)  # plan.report: what and why
    options: dict[str, Any] = field(default_factory=dict)  # convert's options
    # step name -> treatment (NOTE [ Stage treatments ] in coupling.py); a MemoryPlan's dict
    # when convert(plan=...) or memory_budget= chose them
    treatments: dict[str, str] = field(default_factory=dict)
    # the memory-vs-time curve of a planned model, drawn beside the bars by ``plot``: points
    # {"label", "peak_bytes", "time_s"} (``revify audit --budget ... --plot``)
    tradeoff: list[dict[str, Any]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.input_shape[0]

    @property
    def saved_before(self) -> int:
        """Bytes saved for backward by the original model."""
        return sum(r.bytes_before for r in self.rows)

    @property
    def saved_after(self) -> int:
        """Bytes saved for backward by the converted model."""
        return sum(r.bytes_after for r in self.rows)

    @property
    def ratio(self) -> float | None:
        """``saved_after / saved_before`` (None when nothing is saved before)."""
        return self.saved_after / self.saved_before if self.saved_before else None

    @property
    def persistent_bytes(self) -> int:
        """Weights, buffers, gradients and optimizer state: what lives between steps."""
        return self.param_bytes + self.buffer_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def peak_bytes(self) -> int:
        """Training peak of the converted model: persistent bytes + the simulated step peak."""
        return self.persistent_bytes + self.step_peak_after

    @property
    def peak_bytes_before(self) -> int:
        """Training peak of the original model, counted the same way."""
        return self.persistent_bytes + self.step_peak_before

    # -- data --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict: the fields plus the derived totals (bytes, not formatted)."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["input_shape"] = list(self.input_shape)
        d["rows"] = [r.to_dict() for r in self.rows]
        d["report"] = [{"name": r.name, "kind": r.kind, "detail": r.detail} for r in self.report]
        d["options"] = dict(self.options)
        d.update(
            batch_size=self.batch_size,
            saved_before=self.saved_before,
            saved_after=self.saved_after,
            ratio=self.ratio,
            peak_bytes=self.peak_bytes,
            peak_bytes_before=self.peak_bytes_before,
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditReport:
        """Inverse of :meth:`to_dict` (derived totals are recomputed, not read)."""
        kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kwargs["input_shape"] = tuple(d["input_shape"])
        kwargs["rows"] = [AuditRow.from_dict(r) for r in d["rows"]]
        kwargs["report"] = [ReportLine(**r) for r in d.get("report", [])]
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    # -- display -----------------------------------------------------------------------------

    def summary(self) -> list[tuple[str, int, int]]:
        """The training peak before and after conversion as ``(label, before, after)``, the
        total last."""
        fixed = [
            ("weights (parameters)", self.param_bytes),
            ("buffers", self.buffer_bytes),
            ("gradients", self.grad_bytes),
            (f"optimizer state ({self.optimizer})", self.optimizer_bytes),
        ]
        return [(label, b, b) for label, b in fixed] + [
            ("step peak of activations and backward (simulated)", self.step_peak_before,
             self.step_peak_after),
            ("training peak", self.peak_bytes_before, self.peak_bytes),
        ]

    def notes(self) -> list[str]:
        """The pass's decisions other than "reversible": what was checkpointed or left alone."""
        return [f"{r.name} ({r.kind}): {r.detail}" for r in self.report if r.kind != "reversible"]

    def coupling_text(self) -> str:
        """Which coupling the stages run, e.g. ``faithful (alpha=0.984375, beta=0.015625,
        exact)``."""
        o = self.options
        if "alpha" not in o:
            return "not converted"
        exact = ", exact" if o.get("exact") else ""
        return f"{o.get('coupling', 'custom')} (alpha={o['alpha']:g}, beta={o['beta']:g}{exact})"

    def _title(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        return (f"revify audit: {self.model}, input {shape} {self.dtype}, train mode, "
                f"coupling {self.coupling_text()}")

    def _ratio_text(self) -> str:
        return f"{self.ratio:.3f}" if self.ratio is not None else "n/a"

    def to_markdown(self, units: str = "MiB") -> str:
        """A markdown table of the rows, the totals, the estimated peak and the pass's notes."""
        div = _divisor(units)
        if not self.rows:
            return f"## {self._title()}\n\nNo memory tracked.\n"
        lines = [
            f"## {self._title()}",
            "",
            f"| block | treatment | pattern | output shape | before ({units}) | after ({units}) |",
            "| --- | --- | --- | --- | ---: | ---: |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.treatment} | {r.pattern} | {_shape_text(r.output_shape)} "
                f"| {_fmt(r.bytes_before, div)} | {_fmt(r.bytes_after, div)} |"
            )
        lines += [
            f"| **total** | | | | **{_fmt(self.saved_before, div)}** "
            f"| **{_fmt(self.saved_after, div)}** |",
            "",
            f"Saved for backward: {_fmt(self.saved_before, div)} {units} before, "
            f"{_fmt(self.saved_after, div)} {units} after (ratio {self._ratio_text()}).",
            "",
            f"| training memory | before ({units}) | after ({units}) |",
            "| --- | ---: | ---: |",
        ]
        lines += [f"| {label} | {_fmt(b, div)} | {_fmt(a, div)} |"
                  for label, b, a in self.summary()]
        if self.notes():
            lines += ["", "Not made reversible:", ""] + [f"- {n}" for n in self.notes()]
        return "\n".join(lines) + "\n"

    def __rich__(self) -> Any:
        return self._rich_group("MiB")

    def _rich_group(self, units: str) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        div = _divisor(units)
        if not self.rows:
            return Text("No memory tracked.")
        table = Table(title=Text(self._title()), show_footer=True)
        table.add_column("block", footer="total")
        table.add_column("treatment")
        table.add_column("pattern")
        table.add_column("output shape")
        table.add_column(f"before ({units})", justify="right", footer=_fmt(self.saved_before, div))
        table.add_column(f"after ({units})", justify="right", footer=_fmt(self.saved_after, div))
        style = {"reversible": "green", "checkpointed": "cyan", "unchanged": "yellow"}
        for r in self.rows:
            table.add_row(  # Text, not str: "[stage state]" is no rich markup
                Text(r.name), Text(r.treatment, style=style.get(r.treatment, "")),
                Text(r.pattern), _shape_text(r.output_shape),
                _fmt(r.bytes_before, div), _fmt(r.bytes_after, div),
            )
        peak = Table(title="training memory")
        peak.add_column("")
        peak.add_column(f"before ({units})", justify="right")
        peak.add_column(f"after ({units})", justify="right")
        for label, b, a in self.summary():
            peak.add_row(Text(label), _fmt(b, div), _fmt(a, div))
        parts: list[Any] = [table, peak]
        if self.notes():
            parts.append(Text("Not made reversible:\n" + "\n".join(f"  {n}" for n in self.notes())))
        return Group(*parts)

    def print_rich(self, console: Any = None, units: str = "MiB") -> None:
        """Print the tables with ``rich`` on ``console`` (default: a new ``Console``)."""
        from rich.console import Console

        (console or Console()).print(self._rich_group(units))

    def plot(self, path: Any, units: str = "MiB") -> Any:
        """Bar chart of the bytes before/after per row, saved to ``path`` (format from its
        suffix); returns ``path``. Uses matplotlib's Agg canvas, leaving pyplot's backend alone."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        div = _divisor(units)
        names = [r.name for r in self.rows] or ["(no memory tracked)"]
        y = list(range(len(names)))
        height = max(3.0, 0.22 * len(names) + 1.5)
        fig = Figure(figsize=(15 if self.tradeoff else 9, height))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 2, 1) if self.tradeoff else fig.add_subplot()
        if self.tradeoff:
            self._plot_tradeoff(fig.add_subplot(1, 2, 2), div, units)
        ax.barh([i - 0.2 for i in y], [r.bytes_before / div for r in self.rows] or [0],
                height=0.4, label="before")
        ax.barh([i + 0.2 for i in y], [r.bytes_after / div for r in self.rows] or [0],
                height=0.4, label="after")
        ax.set_yticks(y, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"saved for backward ({units})")
        ax.set_title(self._title(), fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        return path

    def _plot_tradeoff(self, ax: Any, div: int, units: str) -> None:
        """Training peak against modelled step time ÷ plain's: the plans chosen over budgets as
        a curve, the other methods as points."""
        plain = next((p["time_s"] for p in self.tradeoff if p["label"] == "plain"), None)
        scale = plain or 1.0
        curve = sorted((p["peak_bytes"] / div, p["time_s"] / scale)
                       for p in self.tradeoff if p["label"] == "planned")
        if curve:
            ax.plot(*zip(*curve, strict=True), "o-", label="revify, planned per budget")
        for p in self.tradeoff:
            if p["label"] != "planned":
                ax.plot(p["peak_bytes"] / div, p["time_s"] / scale, "D", label=p["label"])
        ax.set_xlabel(f"training peak ({units}, simulated)")
        ax.set_ylabel("modelled step time" + (" ÷ plain" if plain else " (s)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def _divisor(units: str) -> int:
    if units not in _UNITS:
        raise ValueError(f"revify.audit: unknown units {units!r}; use one of {list(_UNITS)}")
    return _UNITS[units]


def _fmt(n: int, div: int) -> str:
    return f"{n / div:.2f}"


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "x".join(str(s) for s in shape) if shape is not None else "-"


# ----------------------------------------------------------------------------------------------
# The front


@dataclass(frozen=True)
class _InputSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    example: Tensor | None  # the caller's tensor, if one was given


def audit(
    model: nn.Module,
    example_input_or_shape: Tensor | Sequence[int],
    batch_size: int | None = None,
    *,
    optimizer: str = "sgd",
    **convert_kwargs: Any,
) -> AuditReport:
    """How much memory ``revify.convert`` saves on ``model``, per block, without running it.

    Runs a training step (forward and backward) of the original and of the converted model in
    train mode on fake tensors (``FakeTensorMode``): nothing of the activations' size is
    allocated and no parameter, gradient, buffer (BatchNorm statistics included) or training flag
    of ``model`` changes, nor the CPU RNG state, so ``resnet152`` at batch 256 is audited in
    seconds on a CPU. It counts the bytes
    autograd saves for backward, once per storage and without parameters and buffers (see
    NOTE [ Audit counting ]); a real forward counted the same way gave the same bytes on the
    timm models tried (ResNets, ViT, EfficientNet, MobileNetV3).

    An unconverted model is audited on a ``copy.deepcopy`` converted with
    ``revify.convert(copy, example, **convert_kwargs)`` (its weights are copied once; convert
    the model first to avoid that). A converted model is audited as is, with its original code
    giving the "before" numbers.

    The training peak it reports is weights + buffers + gradients + optimizer state + the peak
    of live tensor bytes over the simulated step (NOTE [ Audit peak ]): the saved activations
    and what the backward allocates, recomputes included. Kernel workspaces and allocator
    fragmentation are not in it.

    Args:
        model: an ``nn.Module`` (converted or not), on any device.
        example_input_or_shape: a floating-point tensor (B, C, H, W), used only for its shape,
            dtype and device; or a shape: ``(C, H, W)`` (``batch_size`` gives B) or a full
            ``(B, C, H, W)``. A shape gets the dtype and device of the model's parameters.
        batch_size: B for a ``(C, H, W)`` shape (default 1); with a tensor it replaces the
            tensor's batch size; with a full shape it must equal ``shape[0]``.
        optimizer: ``"sgd"`` (with momentum: one state tensor per parameter), ``"adam"`` or
            ``"adamw"`` (two), or ``"none"``; only for the peak estimate.
        **convert_kwargs: passed to :func:`revify.convert` (``alpha``, ``beta``,
            ``checkpoint_stem``...) when ``model`` is not converted yet.

    Returns:
        An :class:`AuditReport`; ``print(report.to_markdown())`` or ``report.print_rich()``.

    Raises:
        TypeError: ``model`` is not a module, or the example is neither a floating-point
            tensor nor a shape of ints.
        ValueError: bad ``batch_size``, shape or ``optimizer``.
        RuntimeError: the forward fails on fake tensors of that shape (e.g. BatchNorm in
            train mode with one value per channel).
        revify.ConversionError: from ``convert``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revify.audit: expected an nn.Module, got {type(model).__name__}")
    refuse_stacks("revify.audit", model)
    name, states = _optimizer_states(optimizer)
    spec = _input_spec(model, example_input_or_shape, batch_size)
    if _PLAN not in model.__dict__:
        model = convert(copy.deepcopy(model), _convert_example(spec), **convert_kwargs)
    return _audit_impl(model, spec, name, states)


def _optimizer_states(optimizer: str) -> tuple[str, int]:
    """The optimizer's name, normalised, and its number of state tensors per parameter."""
    name = str(optimizer).lower()
    if name not in _OPTIMIZER_STATES:
        raise ValueError(
            f"revify.audit: unknown optimizer {optimizer!r}; use one of {list(_OPTIMIZER_STATES)}"
        )
    return name, _OPTIMIZER_STATES[name]


def _input_spec(model: nn.Module, example: Any, batch_size: int | None) -> _InputSpec:
    """Shape, dtype and device of the audited input, from a tensor or a shape tuple."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"revify.audit: batch_size must be a positive int, got {batch_size!r}")
    if isinstance(example, Tensor):
        if not example.is_floating_point():
            raise TypeError(
                f"revify.audit: the example input must be a floating-point tensor, got "
                f"{example.dtype}; pass a float tensor or a shape such as (3, 224, 224)"
            )
        shape = tuple(example.shape)
        if batch_size is not None and shape:
            shape = (batch_size, *shape[1:])
        return _InputSpec(shape, example.dtype, example.device, example)
    if not isinstance(example, (tuple, list, torch.Size)) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in example
    ):
        raise TypeError(
            "revify.audit: example_input_or_shape must be a floating-point tensor or a shape of "
            f"ints such as (3, 224, 224), got {example!r:.80}"
        )
    if not example or any(s < 1 for s in example):
        raise ValueError(f"revify.audit: shape must hold positive sizes, got {tuple(example)}")
    shape = tuple(example)
    if len(shape) == 4:
        if batch_size is not None and batch_size != shape[0]:
            raise ValueError(
                f"revify.audit: batch_size={batch_size} contradicts the full shape {shape}; "
                "pass (C, H, W) with batch_size, or the full shape alone"
            )
    else:
        shape = (batch_size or 1, *shape)
    dtype, device = _param_dtype_device(model)
    return _InputSpec(shape, dtype, device, None)


def _param_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


def _convert_example(spec: _InputSpec) -> Tensor:
    """The example ``convert`` traces with: the caller's tensor, else a batch of at most 2
    zeros (``convert`` only reads shapes; the plan does not depend on the batch size)."""
    if spec.example is not None:
        return spec.example
    return torch.zeros(min(spec.shape[0], 2), *spec.shape[1:], dtype=spec.dtype,
                       device=spec.device)


def _audit_impl(model: nn.Module, spec: _InputSpec, optimizer: str, states: int) -> AuditReport:
    plan: Plan | None = model.__dict__.get(_PLAN)
    blocks = plan.blocks if plan is not None else _child_blocks(model)
    labels = _block_labels(model, plan, blocks)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    with _mode._original():
        before, peak_before = _fake_pass(model, spec, labels, shapes)
    after, peak_after = (
        _fake_pass(model, spec, labels, None) if plan is not None else (before, peak_before)
    )
    rows = _rows(plan, blocks, before, after, shapes)
    param_bytes = _storage_bytes(model.parameters())
    grad_bytes = _storage_bytes(p for p in model.parameters() if p.requires_grad)
    return AuditReport(
        model=type(model).__name__,
        input_shape=spec.shape,
        dtype=str(spec.dtype).removeprefix("torch."),
        rows=rows,
        param_bytes=param_bytes,
        buffer_bytes=_storage_bytes(model.buffers()),
        grad_bytes=grad_bytes,
        optimizer=optimizer,
        optimizer_bytes=states * grad_bytes,
        step_peak_before=peak_before,
        step_peak_after=peak_after,
        report=list(plan.report) if plan is not None else [
            ReportLine(type(model).__name__, "unchanged", "no chain of identity residual units")
        ],
        options=dict(plan.options) if plan is not None else {},
        treatments={st.run.name: _treatment(st.run) for st in plan.steps} if plan else {},
    )


def _child_blocks(model: nn.Module) -> list[Block]:
    """Rows for a model ``convert`` left alone: its direct children."""
    return [Block(name, "", "unchanged") for name, _ in model.named_children()]


def _storage_bytes(tensors: Iterable[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------
# Counting


class _SavedBytes:
    """Pack hook for ``saved_tensors_hooks``: bytes per attribution key, one count per storage.

    ``stack`` holds the keys of the block modules running now (pushed and popped by hooks).
    """

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.seen: set[int] = set()
        self.keep: list[Tensor] = []  # keeps storages alive so that addresses are not reused
        self.stack: list[_Key] = []
        self.bytes: dict[_Key, int] = defaultdict(int)

    def pack(self, t: Tensor) -> Tensor:
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.excluded and key not in self.seen:
            self.seen.add(key)
            self.keep.append(t)
            self.bytes[self._owner()] += st.nbytes()
        return t

    def _owner(self) -> _Key:
        if self.stack:
            return self.stack[-1]
        step = _mode.current_step.get()
        return ("step", step) if step is not None else (_OTHER, "")


def _unpack(t: Tensor) -> Tensor:
    return t


def _block_labels(
    model: nn.Module, plan: Plan | None, blocks: list[Block]
) -> dict[nn.Module, list[str]]:
    """Module -> the blocks it runs for, in plan order. An inline unit (``owner:add``) has no
    module of its own: its branch's modules stand for it, and a branch module shared by several
    units (``x + f(x)`` twice) stands for each of them."""
    units = {u.name: u for s in (plan.stages if plan is not None else []) for u in s.units}
    labels: dict[nn.Module, list[str]] = {}
    for b in blocks:
        if b.name in units and ":" in b.name:
            modules = list(units[b.name].modules)
        else:
            try:
                modules = [model.get_submodule(b.name)]
            except AttributeError:
                modules = []
        for m in modules:
            names = labels.setdefault(m, [])
            if b.name not in names:
                names.append(b.name)
    return labels


@contextlib.contextmanager
def _hooks(
    labels: dict[nn.Module, list[str]],
    counter: _SavedBytes,
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None,
) -> Iterator[None]:
    """Push a block's key while its module runs; record output shapes into ``shapes``.

    The k-th call of a module shared by n blocks goes to its (k mod n)-th block: the original
    forward calls the units in plan order.
    """
    modules_of = Counter(name for names in labels.values() for name in names)
    calls: Counter[nn.Module] = Counter()

    @own_hook  # reads no tensor (foreign_hooks in _replay.py does not count it)
    def pre(module: nn.Module, args: Any) -> None:
        names = labels[module]
        counter.stack.append(("block", names[calls[module] % len(names)]))
        calls[module] += 1

    @own_hook
    def post(module: nn.Module, args: Any, output: Any) -> None:
        _, name = counter.stack.pop()
        # A block standing for several modules (an inline unit) has no single output.
        if shapes is not None and modules_of[name] == 1 and isinstance(output, Tensor):
            shapes.setdefault(name, (tuple(output.shape), output.dtype))

    handles = []
    for module in labels:
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _stage_attributes(model: nn.Module) -> Iterator[None]:
    """The stages' reconstruction error comes back as it was (a fake backward would leave a
    fake tensor there)."""
    plan: Plan | None = model.__dict__.get(_PLAN)
    stages = plan.stages if plan is not None else []
    kept = [(st, st.last_reconstruction_error) for st in stages]
    try:
        yield
    finally:
        for st, err in kept:
            st.last_reconstruction_error = err


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    """Train mode for the pass; every module's own ``training`` flag is restored after."""
    with training_kept(model):
        model.train()
        yield


def _fake_pass(
    model: nn.Module,
    spec: _InputSpec,
    labels: dict[nn.Module, list[str]],
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None,
) -> tuple[dict[_Key, int], int]:
    """One train-mode training step on fake tensors: bytes saved for backward per key, counted
    in the forward, and the peak of live bytes over forward and backward (NOTE [ Audit peak ])."""
    live = LiveBytes()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_train_mode(model))
        stack.enter_context(_stage_attributes(model))
        stack.enter_context(fake_model(model))
        stack.enter_context(torch.enable_grad())
        own = [*model.parameters(), *model.buffers()]  # their fakes, now
        counter = _SavedBytes({t.untyped_storage()._cdata for t in own})
        x = torch.empty(spec.shape, dtype=spec.dtype, device=spec.device)
        try:
            with _hooks(labels, counter, shapes), live, torch.autograd.graph.saved_tensors_hooks(
                counter.pack, _unpack
            ):
                out = model(x)
        except Exception as e:
            raise RuntimeError(
                f"revify.audit: the train-mode forward of {type(model).__name__} on a fake "
                f"input of shape {spec.shape} failed ({type(e).__name__}: {e}); check the "
                "shape and batch size"
            ) from e
        counter.keep.clear()  # the counting is done: let the backward free what it frees
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
        del out
        with live:
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
            del outs
    return dict(counter.bytes), live.peak


# ----------------------------------------------------------------------------------------------
# Rows


def _treatment(run: Any) -> str:
    if isinstance(run, ReversibleStage):
        return run.treatment
    return "checkpoint" if run.checkpoint else "store"


def _step_rows(plan: Plan | None) -> dict[str, tuple[str, str]]:
    """Step name -> (row label, treatment), in execution order."""
    out: dict[str, tuple[str, str]] = {}
    for step in plan.steps if plan is not None else []:
        run = step.run
        if isinstance(run, ReversibleStage):
            kind = {"reversible": "reversible", "store": "unchanged"}.get(run.treatment,
                                                                          "checkpointed")
            out.setdefault(run.name, (f"{run.name} [stage state]", kind))
        elif run.checkpoint:
            out.setdefault(run.name, (f"{run.name} [checkpoint inputs]", "checkpointed"))
        else:
            out.setdefault(run.name, (f"{run.name} [outside blocks]", "unchanged"))
    return out


def _rows(
    plan: Plan | None,
    blocks: list[Block],
    before: dict[_Key, int],
    after: dict[_Key, int],
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> list[AuditRow]:
    """One row per block in plan order, each step's own row after its blocks, then "other"."""
    rows: list[AuditRow] = []
    steps = _step_rows(plan)
    by_step: dict[str, list[Block]] = defaultdict(list)
    for b in blocks:
        by_step[b.step].append(b)
    order = list(steps) + [s for s in by_step if s not in steps]
    for step in order:
        for b in by_step.get(step, []):
            key = ("block", b.name)
            shape = shapes.get(b.name, (None, None))[0]
            rows.append(AuditRow(b.name, b.treatment, shape, before.get(key, 0),
                                 after.get(key, 0), b.step or None, pattern=b.pattern))
        if step in steps:
            key = ("step", step)
            label, treatment = steps[step]
            if before.get(key, 0) or after.get(key, 0):
                rows.append(AuditRow(label, treatment, None, before.get(key, 0),
                                     after.get(key, 0), step, "step"))
    key = (_OTHER, "")
    rows.append(AuditRow(_OTHER, "unchanged", None, before.get(key, 0), after.get(key, 0),
                         None, "other"))
    return rows
