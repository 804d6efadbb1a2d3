"""The memory planner: per-step treatments, the fastest plan under a memory budget, and the
largest batch that fits.

A converted model runs its trunk as steps: reversible stages and the segments between them
(stem, transitions, tail). Each step can be treated in several ways that trade memory for
recompute time (NOTE [ Stage treatments ] in coupling.py): a stage ``"reversible"``,
``"checkpoint"`` (per unit), ``"checkpoint:k"`` (its first k units) or ``"store"``; a segment
``"checkpoint"`` or ``"store"``. A :class:`MemoryPlan` names one treatment per step; the
treatments change what a step stores, never what the model computes.

NOTE [ Planning ]
``choose`` measures three uniform plans (everything reversible with checkpointed segments,
every stage checkpointed, everything stored) on fake tensors, once each, attributing every
op's bytes and modelled time to its step (NOTE [ Step costs ] in _costs.py). Any mix is then
composed from those terms: its peak is the largest over steps and phases of "what the steps
before hold + what this step holds or allocates", its time the sum of the steps' times. All
mixes are enumerated at once as numpy arrays (ResNet-152: 4 stages x 6 treatments x 2^4
segment choices), the fastest whose composed peak fits is taken, then simulated for real: when
the simulation exceeds the budget (composition misses e.g. a step's backward overlapping the
next), the budget used for choosing is lowered by the excess and the choice made again. So the
returned plan's simulated peak fits, and its modelled time is the least of every mix the model
composes, uniform plans included.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _costs
from ._plan import Block, ConversionError, Plan, ReportLine
from .audit import _treatment as treatment_of
from .checkpoint import Segment
from .convert import convert, plans
from .coupling import ReversibleStage, _checkpointed_units

__all__ = ["MemoryPlan", "plan_memory", "memory_plan", "fit", "FitRow"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MAX_MIXES = 1 << 21  # enumerated at once; beyond, fewer partial checkpoints are offered


@dataclass
class MemoryPlan:
    """A treatment per plan step (stage or segment name), and what planning predicted for it.

    ``convert(model, example_input, plan=memory_plan)`` installs it; ``str(plan)`` prints it;
    ``to_json`` / ``from_json`` round-trip it. Steps it does not name keep ``convert``'s
    default treatment (stages reversible, stem and transitions checkpointed).

    Attributes:
        treatments: step name -> ``"reversible"``, ``"checkpoint"``, ``"checkpoint:k"`` or
            ``"store"`` (segments: ``"checkpoint"`` or ``"store"``).
        budget_bytes: the budget it was chosen for (None: given by hand).
        peak_bytes: the simulated training peak of one step: weights, buffers, gradients,
            optimizer state and the live tensors of the step (as ``revify.audit``'s peak).
        time_s: modelled step time on ``device`` (NOTE [ Step costs ] in _costs.py).
        input_shape, device: the step planned for.
        baselines: per method (``"plain"``, ``"timm-ckpt"``, ``"minimum"``), its simulated
            ``peak_bytes`` and modelled ``time_s`` for the same step.
        tradeoff: the plans chosen at budgets from the minimum to plain's peak, each
            ``{"budget_bytes", "peak_bytes", "time_s"}`` (``plan_memory(tradeoff_points=n)``).
    """

    treatments: dict[str, str]
    budget_bytes: int | None = None
    peak_bytes: int | None = None
    time_s: float | None = None
    input_shape: tuple[int, ...] | None = None
    device: str = ""
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    # (peak_bytes, time_s, budget_bytes) of the plans chosen over budgets (plan_memory's
    # ``tradeoff_points``): the memory-vs-time curve
    tradeoff: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemoryPlan:
        known = {k: d[k] for k in ("treatments", "budget_bytes", "peak_bytes", "time_s",
                                   "device", "baselines", "tradeoff") if k in d}
        if not isinstance(known.get("treatments"), Mapping):
            raise ValueError("revify.MemoryPlan.from_dict: needs a 'treatments' mapping")
        known["treatments"] = {str(k): str(v) for k, v in known["treatments"].items()}
        shape = d.get("input_shape")
        return cls(**known, input_shape=tuple(shape) if shape is not None else None)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> MemoryPlan:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        width = max([len(n) for n in self.treatments] + [4])
        lines = [f"{'step':<{width}}  treatment"]
        lines += [f"{n:<{width}}  {t}" for n, t in self.treatments.items()]
        rows = [("revify plan", self.peak_bytes, self.time_s)]
        rows += [(m, b.get("peak_bytes"), b.get("time_s")) for m, b in self.baselines.items()]
        if any(p is not None for _, p, _ in rows):
            lines.append("")
            shape = f" for input {tuple(self.input_shape)}" if self.input_shape else ""
            budget = f", budget {_gib(self.budget_bytes)}" if self.budget_bytes else ""
            lines.append(f"predicted training step{shape} on {self.device or '?'}{budget}:")
            for name, peak, secs in rows:
                if peak is not None:
                    lines.append(f"  {name:<12} peak {_gib(peak):>10}   time {secs * 1e3:9.1f} ms")
        return "\n".join(lines)


def _gib(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def parse_budget(budget: int | float | str, plain_peak: int | None = None) -> int:
    """Bytes from an int, a string such as ``"12GiB"`` or ``"800 MB"``, or a float in (0, 1]:
    that fraction of ``plain_peak`` (plain training's simulated peak)."""
    if isinstance(budget, bool):
        raise TypeError(f"revify: memory_budget must be bytes, a size string or a fraction, "
                        f"got {budget!r}")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"revify: memory_budget must be positive, got {budget}")
        return budget
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(
                f"revify: a float memory_budget is a fraction of plain training's peak, in "
                f"(0, 1]; got {budget} (give bytes as an int or a string such as '12GiB')"
            )
        if plain_peak is None:
            raise ValueError("revify: a fractional memory_budget needs plain training's peak")
        return int(budget * plain_peak)
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if n > 0:
                return int(n)
        raise ValueError(f"revify: cannot read memory_budget {budget!r}; use e.g. '24GiB', "
                         "'800MB', a number of bytes, or a fraction such as 0.5")
    raise TypeError(f"revify: memory_budget must be bytes, a size string or a fraction, got "
                    f"{type(budget).__name__}")


# ----------------------------------------------------------------------------------------------
# Installing treatments


def options_of(run: ReversibleStage | Segment) -> list[str]:
    """The treatments a step accepts, in the planner's order."""
    if isinstance(run, ReversibleStage):
        n = len(run.units)
        partial = sorted({max(1, min(n - 1, round(n * i / 9))) for i in range(1, 9)})[:n - 1]
        return ["reversible", "checkpoint", "store"] + [f"checkpoint:{k}" for k in partial]
    return ["checkpoint", "store"] if run.checkpointable else ["store"]


def current(plan: Plan) -> dict[str, str]:
    """The treatment of every step of ``plan`` now, in execution order."""
    return {step.run.name: treatment_of(step.run) for step in plan.steps}


def apply(plan: Plan, treatments: Mapping[str, str], by_plan: bool = True) -> None:
    """Set the steps' treatments (validated first, so nothing changes on error); ``by_plan``:
    the report says the memory plan chose them (not for the planner's own trials)."""
    runs = {step.run.name: step.run for step in plan.steps}
    unknown = [n for n in treatments if n not in runs]
    if unknown:
        raise ValueError(
            f"revify: the memory plan names steps this model does not have: "
            f"{', '.join(map(repr, unknown))}; its steps are {', '.join(map(repr, runs))}"
        )
    for name, t in treatments.items():
        run = runs[name]
        if isinstance(run, ReversibleStage):
            _checkpointed_units(name, t, len(run.units))  # raises for a bad treatment
        elif t not in ("checkpoint", "store"):
            raise ValueError(f"revify: segment {name}: unknown treatment {t!r}; use "
                             "'checkpoint' or 'store'")
        elif t == "checkpoint" and not run.checkpointable:
            raise ValueError(
                f"revify: segment {name} cannot be checkpointed ("
                + ("the tail's backward follows its forward" if name == "tail"
                   else "no parameters or non-tensor outputs") + "); use 'store'"
            )
    for name, t in treatments.items():
        run = runs[name]
        if isinstance(run, ReversibleStage):
            run.treatment = t
        else:
            run.checkpoint = t == "checkpoint"
    kinds = {"reversible": "reversible", "store": "unchanged"}
    segments = {n for n, r in runs.items() if isinstance(r, Segment)}
    note = " (by the memory plan)"
    plan.report[:] = [
        ReportLine(r.name, "checkpointed" if runs[r.name].checkpoint else "unchanged",
                   r.detail.removesuffix(note) + (note if r.name in treatments else ""))
        if r.name in segments and by_plan else r
        for r in plan.report
    ]
    seen: dict[str, int] = {}  # per stage, its blocks so far: block j is unit j
    blocks = []
    for b in plan.blocks:
        run = runs.get(b.step)
        if run is None:
            blocks.append(b)
            continue
        kind = kinds.get(treatment_of(run), "checkpointed")
        if isinstance(run, ReversibleStage) and ":" in run.treatment:  # checkpoint:k
            j = seen[b.step] = seen.get(b.step, -1) + 1
            if j < len(run.units) and run.units[j].name == b.name:
                kind = "checkpointed" if j < run._checkpointed else "unchanged"
        blocks.append(Block(b.name, b.step, kind, b.pattern))
    plan.blocks[:] = blocks


def install(model: nn.Module, memory_plan: MemoryPlan | Mapping[str, Any]) -> None:
    """``convert(model, plan=...)``: apply a :class:`MemoryPlan` (or its dict) to ``model``'s
    one plan."""
    if isinstance(memory_plan, Mapping):
        memory_plan = MemoryPlan.from_dict(
            memory_plan if "treatments" in memory_plan else {"treatments": memory_plan}
        )
    if not isinstance(memory_plan, MemoryPlan):
        raise TypeError(f"revify.convert: plan must be a revify.MemoryPlan or a dict, got "
                        f"{type(memory_plan).__name__}")
    plan = _one_plan(model, "plan")
    apply(plan, memory_plan.treatments)
    plan.memory_plan = memory_plan  # its predictions, for revify.memory_plan


def memory_plan(model: nn.Module) -> MemoryPlan:
    """The treatment of every step of a converted model now, with what planning predicted when
    ``convert(memory_budget=...)`` chose them."""
    plan = _one_plan(model, "revify.memory_plan")
    chosen = plan.memory_plan
    now = current(plan)
    if chosen is not None and chosen.treatments == {k: now[k] for k in chosen.treatments}:
        return MemoryPlan(now, chosen.budget_bytes, chosen.peak_bytes, chosen.time_s,
                          chosen.input_shape, chosen.device, dict(chosen.baselines))
    return MemoryPlan(now)


def _one_plan(model: nn.Module, what: str) -> Plan:
    found = plans(model)
    if len(found) != 1 or found[0][0] != "":
        raise ConversionError(
            f"revify: {what} needs a model whose trunk converts as one plan; "
            f"{type(model).__name__} converted "
            + (f"as submodules ({', '.join(p for p, _ in found)})" if found else "nothing")
        )
    return found[0][1]


# ----------------------------------------------------------------------------------------------
# Choosing


@dataclass
class _Terms:
    """One step's composed terms per treatment: arrays over its options."""

    name: str
    options: list[str]
    held: np.ndarray  # what its forward leaves alive
    fwd: np.ndarray  # forward peak above its start
    own: np.ndarray  # alive at its backward's start beyond what the steps before it hold
    bwd: np.ndarray  # backward peak above its start
    time: np.ndarray


def _step_terms(name: str, options: list[str], by: dict[str, _costs.Measurement],
                n_units: int) -> _Terms:
    """Terms of ``name`` per option from the uniform measurements ``by`` (keyed by the
    treatment each measured it under). A partial checkpoint interpolates every term between
    the stage checkpointed and stored, in the number of checkpointed units (the planner
    simulates what it chooses, so an error here costs a second choice, not a wrong answer)."""

    def one(t: str) -> tuple[float, float, float, float, float]:
        m = by[t]
        c = m.steps.get(name)
        if c is None:  # no op of its own in this measurement
            return 0.0, 0.0, -math.inf, 0.0, 0.0
        before = sum(m.steps[n].held for n in itertools.takewhile(lambda n: n != name, m.steps))
        own = c.bwd_start - before if c.bwd_start >= 0 else -math.inf
        return c.held, c.fwd_extra, own, c.bwd_extra, c.time_s

    rows = []
    for t in options:
        if t.startswith("checkpoint:"):
            k = int(t.split(":")[1]) / n_units
            a, b = one("checkpoint"), one("store")
            rows.append(tuple(k * x + (1 - k) * y for x, y in zip(a, b, strict=True)))
        else:
            rows.append(one(t))
    held, fwd, own, bwd, tm = (np.array(col, dtype=np.float64)
                               for col in zip(*rows, strict=True))
    return _Terms(name, options, held, fwd, own, bwd, tm)


def _compose(terms: list[_Terms]) -> tuple[np.ndarray, np.ndarray]:
    """Composed live peak and time of every mix, as arrays indexed by the options' positions."""
    dims = len(terms)
    cum = np.zeros((1,) * dims)
    peak = np.full((1,) * dims, -np.inf)
    total = np.zeros((1,) * dims)
    for i, t in enumerate(terms):
        shape = [1] * dims
        shape[i] = len(t.options)
        peak = np.maximum(peak, cum + t.fwd.reshape(shape))
        peak = np.maximum(peak, cum + (t.own + t.bwd).reshape(shape))
        cum = cum + t.held.reshape(shape)
        total = total + t.time.reshape(shape)
    return peak, total


class _Planner:
    """Measurements of one converted model for one input shape, and choices from them."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, optimizer_states: int = 1, precision: str = "fp32"
                 ) -> None:
        self.model, self.shape, self.dtype, self.device = model, shape, dtype, device
        self.autocast = _autocast(precision)
        self.plan = _one_plan(model, "memory planning")
        self.speed = _costs.speed(str(device))
        self.persistent = persistent_bytes(model, optimizer_states)
        runs = [step.run for step in self.plan.steps]
        self.runs = {r.name: r for r in runs}
        uniform = {
            "reversible": {r.name: ("reversible" if isinstance(r, ReversibleStage) else
                                    "checkpoint" if r.checkpointable else "store") for r in runs},
            "checkpoint": {r.name: ("checkpoint" if isinstance(r, ReversibleStage) or
                                    r.checkpointable else "store") for r in runs},
            "store": {r.name: "store" for r in runs},
        }
        self.uniform = uniform
        kept = current(self.plan)
        self.measured: dict[str, _costs.Measurement] = {}
        try:
            for key, treatments in uniform.items():
                apply(self.plan, treatments, by_plan=False)
                self.measured[key] = self.run(model)
        finally:
            apply(self.plan, kept, by_plan=False)
        names = [n for n in self.measured["store"].steps]
        self.terms = []
        for name in names:
            run = self.runs.get(name)
            if run is None:  # <input>, <loss>: the same in every mix
                opts, by = ["store"], {"store": self.measured["store"]}
            elif isinstance(run, ReversibleStage):
                opts = options_of(run)
                by = {t: self.measured[t] for t in ("reversible", "checkpoint", "store")}
            else:
                opts = options_of(run)
                by = {"checkpoint": self.measured["reversible"], "store": self.measured["store"]}
            self.terms.append(_step_terms(name, opts, by,
                                          len(run.units) if isinstance(run, ReversibleStage)
                                          else 1))
        self._trim()
        self.peaks, self.times = _compose(self.terms)

    def _trim(self) -> None:
        """Fewer partial checkpoints while the mixes are too many to enumerate."""
        while math.prod(len(t.options) for t in self.terms) > _MAX_MIXES:
            t = max(self.terms, key=lambda t: len(t.options))
            keep = [i for i, o in enumerate(t.options) if not o.startswith("checkpoint:")]
            if len(keep) == len(t.options):
                break
            drop = max(i for i, o in enumerate(t.options) if o.startswith("checkpoint:"))
            keep = [i for i in range(len(t.options)) if i != drop]
            t.options = [t.options[i] for i in keep]
            t.held, t.fwd, t.own, t.bwd, t.time = (
                a[keep] for a in (t.held, t.fwd, t.own, t.bwd, t.time))

    def run(self, model: nn.Module, original: bool = False) -> _costs.Measurement:
        """One simulated training step of ``model`` for the planned input."""
        return _costs.measure(model, self.shape, self.dtype, self.device, self.speed,
                              original=original, autocast=self.autocast)

    def treatments(self, index: Sequence[int]) -> dict[str, str]:
        return {t.name: t.options[i] for t, i in zip(self.terms, index, strict=True)
                if t.name in self.runs}

    def simulate(self, treatments: Mapping[str, str]) -> _costs.Measurement:
        kept = current(self.plan)
        apply(self.plan, treatments, by_plan=False)
        try:
            return self.run(self.model)
        finally:
            apply(self.plan, kept, by_plan=False)

    def minimum(self) -> tuple[int, ...]:
        """The mix of least composed peak (ties: least time)."""
        flat = np.lexsort((self.times.ravel(), self.peaks.ravel()))[0]
        return tuple(int(i) for i in np.unravel_index(flat, self.peaks.shape))

    def fastest_within(self, live_budget: float) -> tuple[int, ...] | None:
        ok = self.peaks <= live_budget
        if not ok.any():
            return None
        times = np.where(ok, self.times, np.inf)
        best = times.min()
        tied = ok & (times <= best * (1 + 1e-12))
        flat = int(np.argmin(np.where(tied, self.peaks, np.inf)))
        return tuple(int(i) for i in np.unravel_index(flat, self.peaks.shape))

    def choose(self, budget: int) -> tuple[dict[str, str], _costs.Measurement]:
        """The fastest mix whose simulated peak fits ``budget`` (NOTE [ Planning ]): the
        composed choice, verified, or a uniform plan (simulated exactly) when one is faster."""
        fits = [(m.time_s, self.uniform[key], m) for key, m in self.measured.items()
                if m.peak + self.persistent <= budget]
        target = budget - self.persistent
        for attempt in range(6):
            index = self.fastest_within(target)
            if index is None:
                break
            chosen = self.treatments(index)
            sim = self.simulate(chosen)
            if sim.peak + self.persistent <= budget:
                fits.append((sim.time_s, chosen, sim))
                break
            # below the composed peak of what overshot, by its excess, more at each retry
            excess = sim.peak + self.persistent - budget
            target = min(target, float(self.peaks[index])) - excess * (attempt + 1)
        if not fits:
            low = self.treatments(self.minimum())
            sim = self.simulate(low)
            if sim.peak + self.persistent <= budget:
                return low, sim
            least = min([sim.peak] + [m.peak for m in self.measured.values()])
            raise ValueError(
                f"revify: memory_budget {_gib(budget)} cannot be met for input {self.shape}: "
                f"the smallest training peak revify reaches is {_gib(least + self.persistent)} "
                f"(weights, gradients and optimizer state alone {_gib(self.persistent)}); "
                "use a smaller batch or a larger budget"
            )
        _, chosen, sim = min(fits, key=lambda f: (f[0], f[2].peak))
        return dict(chosen), sim

    def baselines(self, original: nn.Module | None) -> dict[str, dict[str, float]]:
        """Simulated peak and modelled time of plain training and timm's checkpointing (from
        the unconverted ``original``) and of the minimum-memory plan, for the same step."""
        out = {}
        if original is not None:
            plain = self.run(original)
            out["plain"] = dict(peak_bytes=plain.peak + self.persistent, time_s=plain.time_s)
            timm_ckpt = _timm_checkpointed(original)
            if timm_ckpt is not None:
                m = self.run(timm_ckpt)
                out["timm-ckpt"] = dict(peak_bytes=m.peak + self.persistent, time_s=m.time_s)
        low = self.measured["reversible"]  # convert's default plan
        out["minimum"] = dict(peak_bytes=low.peak + self.persistent, time_s=low.time_s)
        return out


def _tradeoff(p: _Planner, baselines: dict[str, dict[str, float]], points: int
              ) -> list[dict[str, float]]:
    """The plans chosen at ``points`` budgets from the minimum peak to plain's (or store's)."""
    low = baselines["minimum"]["peak_bytes"]
    high = baselines.get("plain", {}).get("peak_bytes",
                                          p.measured["store"].peak + p.persistent)
    out = []
    for i in range(points):
        budget = int(low + (high - low) * i / max(points - 1, 1))
        try:
            _, sim = p.choose(budget)
        except ValueError:
            continue
        out.append(dict(budget_bytes=budget, peak_bytes=sim.peak + p.persistent,
                        time_s=sim.time_s))
    return out


def persistent_bytes(model: nn.Module, optimizer_states: int = 1) -> int:
    """Weights, buffers, gradients and ``optimizer_states`` state tensors per parameter
    requiring grad (SGD momentum: 1): what lives between steps, as ``AuditReport`` counts it."""
    from .audit import _storage_bytes

    grads = _storage_bytes(p for p in model.parameters() if p.requires_grad)
    return (_storage_bytes(model.parameters()) + _storage_bytes(model.buffers())
            + grads * (1 + optimizer_states))


def _autocast(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``: ``"fp32"`` (none), ``"bf16"`` or ``"fp16"``."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"revify: precision must be one of {list(dtypes)}, got {precision!r}")
    return dtypes[precision]


def _timm_checkpointed(model: nn.Module) -> nn.Module | None:
    """A copy of an unconverted timm-style model with ``set_grad_checkpointing(True)``."""
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        return None
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    return ckpt


def _spec(model: nn.Module, example: Any, batch_size: int | None) -> Any:
    from .audit import _input_spec

    return _input_spec(model, example, batch_size)


def plan_memory(
    model: nn.Module,
    example_input_or_shape: Any,
    batch_size: int | None = None,
    *,
    memory_budget: int | float | str,
    optimizer: str = "sgd",
    precision: str = "fp32",
    tradeoff_points: int = 0,
    **convert_kwargs: Any,
) -> MemoryPlan:
    """The fastest :class:`MemoryPlan` whose simulated training peak fits ``memory_budget``.

    Simulates training steps of ``model`` on fake tensors (as :func:`revify.audit` does: no
    activation is allocated, the model does not change) and chooses one treatment per stage
    and segment (NOTE [ Planning ]). Install the result with
    ``revify.convert(model, example_input, plan=memory_plan)``.

    Args:
        model: an unconverted ``nn.Module`` (a deep copy is converted for planning; its
            ``plain`` and ``timm-ckpt`` baselines come from the original), or one converted
            already (planned in place, without those baselines).
        example_input_or_shape: as for :func:`revify.audit`: a tensor (only its shape, dtype
            and device are used), ``(C, H, W)`` with ``batch_size``, or a full shape.
        memory_budget: bytes (int), a string such as ``"24GiB"``, or a float in (0, 1]: that
            fraction of plain training's simulated peak. The peak counts weights, buffers,
            gradients, optimizer state and the step's live tensors (``audit``'s peak).
        optimizer: ``"sgd"`` (momentum), ``"adam"``, ``"adamw"`` or ``"none"``: its state.
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"``: the forward under autocast.
        tradeoff_points: also choose at that many budgets from the minimum to plain's peak
            (``MemoryPlan.tradeoff``: the memory-vs-time curve; one simulation or more each).
        **convert_kwargs: for ``revify.convert`` (coupling options) when ``model`` is not
            converted yet.

    Raises:
        ValueError: an unreadable budget, or one no plan meets (the message gives the least
            peak reachable).
        revify.ConversionError: the model does not convert as one plan.
    """
    from .audit import _convert_example, _optimizer_states

    _, states = _optimizer_states(optimizer)
    spec = _spec(model, example_input_or_shape, batch_size)
    original = None
    if not plans(model):
        original = model
        model = convert(copy.deepcopy(model), _convert_example(spec), strict=True,
                        **convert_kwargs)
    planner = _Planner(model, spec.shape, spec.dtype, spec.device, states, precision)
    baselines = planner.baselines(original)
    plain_peak = baselines.get("plain", {}).get("peak_bytes")
    budget = parse_budget(memory_budget, None if plain_peak is None else int(plain_peak))
    chosen, sim = planner.choose(budget)
    plain = baselines.get("plain")
    if plain is not None:
        _plain_would_do(plain["peak_bytes"], plain["time_s"], budget, sim.time_s)
    tradeoff = _tradeoff(planner, baselines, tradeoff_points) if tradeoff_points > 0 else []
    return MemoryPlan(chosen, budget, sim.peak + planner.persistent, sim.time_s, spec.shape,
                      planner.speed.device, baselines, tradeoff)


def _plain_would_do(plain_peak: float, plain_time: float, budget: int, time_s: float) -> None:
    """Warn when the unconverted model fits the budget and is modelled faster: every revify
    treatment of a stage computes the coupling (NOTE [ Stage treatments ]), which costs some
    arithmetic even where it stores everything."""
    if plain_peak <= budget and plain_time < time_s:
        warnings.warn(
            f"revify: plain training (unconverted) fits memory_budget {_gib(budget)} "
            f"(simulated peak {_gib(plain_peak)}) and is modelled {time_s / plain_time:.2f}x "
            "faster than the best converted plan; converting pays only below that peak",
            stacklevel=3,
        )


def plan_converted(model: nn.Module, example: Any, memory_budget: Any) -> MemoryPlan:
    """``convert(model, example, memory_budget=...)``: choose for the converted ``model`` in
    place (a fractional budget refers to the original code's peak) and install the plan."""
    spec = _spec(model, example, None)
    planner = _Planner(model, spec.shape, spec.dtype, spec.device)
    m = planner.run(model, original=True)  # the original code: for a fraction, and the warning
    plain = m.peak + planner.persistent
    budget = parse_budget(memory_budget, plain)
    chosen, sim = planner.choose(budget)
    _plain_would_do(plain, m.time_s, budget, sim.time_s)
    apply(planner.plan, chosen)
    return MemoryPlan(chosen, budget, sim.peak + planner.persistent, sim.time_s, spec.shape,
                      planner.speed.device, {"plain": dict(peak_bytes=plain, time_s=m.time_s)})


# ----------------------------------------------------------------------------------------------
# Will it fit?


@dataclass(frozen=True)
class FitRow:
    """The largest batch of one method whose simulated training peak fits the memory."""

    method: str  # "plain", "timm-ckpt" or "revify"
    batch_size: int
    peak_bytes: int
    time_s: float  # modelled step time at that batch

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / self.time_s if self.time_s > 0 else math.inf


def fit(
    model: nn.Module,
    shape: Sequence[int],
    memory: int | str,
    *,
    optimizer: str = "sgd",
    precision: str = "fp32",
    verify: bool = False,
    **convert_kwargs: Any,
) -> list[FitRow]:
    """Per method (plain, timm's checkpointing where the model has it, revify's minimum-memory
    plan), the largest batch of inputs of ``shape`` (C, H, W) whose simulated training peak
    fits ``memory`` (bytes or a string such as ``"80GiB"``), with its modelled step time.

    Each method's step is simulated on fake tensors at batches 8 and 16; its live bytes and
    time grow linearly with the batch (every activation does), so the largest batch is
    extrapolated from those two (``verify=True`` simulates it there too, and steps down until
    it fits: slower for large batches). A method that does not fit at batch 1 gets
    ``batch_size=0``.
    """
    from .audit import _optimizer_states, _param_dtype_device

    _, states = _optimizer_states(optimizer)
    budget = parse_budget(memory)
    if plans(model):
        raise ValueError("revify.fit: pass the unconverted model (it compares plain training)")
    if len(shape) < 1 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"revify.fit: shape must be positive sizes without the batch, "
                         f"e.g. (3, 224, 224); got {tuple(shape)}")
    dtype, device = _param_dtype_device(model)
    spd = _costs.speed(str(device))
    autocast = _autocast(precision)
    persistent = persistent_bytes(model, states)
    converted = convert(copy.deepcopy(model), torch.zeros(2, *shape, dtype=dtype, device=device),
                        strict=True, **convert_kwargs)
    methods: list[tuple[str, nn.Module]] = [("plain", model)]
    timm_ckpt = _timm_checkpointed(model)
    if timm_ckpt is not None:
        methods.append(("timm-ckpt", timm_ckpt))
    methods.append(("revify", converted))
    rows = []
    for name, m in methods:
        def run(b: int, m: nn.Module = m) -> _costs.Measurement:
            return _costs.measure(m, (b, *tuple(shape)), dtype, device, spd, autocast=autocast)

        rows.append(_largest_batch(name, run, budget - persistent, persistent, verify))
    return rows


def _largest_batch(name: str, run: Any, room: int, persistent: int, verify: bool) -> FitRow:
    """The largest batch whose simulated live peak is at most ``room`` (``fit``)."""
    small, large = run(8), run(16)
    per_sample = max((large.peak - small.peak) / 8, 1.0)
    fixed = small.peak - 8 * per_sample
    per_s = (large.time_s - small.time_s) / 8
    b = int((room - fixed) // per_sample)
    if b < 1:
        one = run(1)
        if one.peak > room:
            return FitRow(name, 0, one.peak + persistent, one.time_s)
        return FitRow(name, 1, one.peak + persistent, one.time_s)
    if not verify:
        return FitRow(name, b, int(fixed + b * per_sample) + persistent,
                      small.time_s + (b - 8) * per_s)
    for _ in range(6):
        m = run(b)
        if m.peak <= room:
            return FitRow(name, b, m.peak + persistent, m.time_s)
        b = max(1, min(b - 1, int(b * room / m.peak)))
    return FitRow(name, b, m.peak + persistent, m.time_s)
