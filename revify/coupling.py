"""The two-stream reversible coupling and the autograd nodes that run it.

A reversible stage replaces a chain of identity residual units ``x <- x + R_k(x)`` with

    x_{k+1} = beta * x_{k-1} + alpha * x_k + R_k(x_k),      x_{-1} = x_0 = stage input,

which keeps every pretrained unit at full width (DESIGN.md §2). ``alpha=0, beta=1`` is the RevNet
coupling ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` with consecutive units as F and G. Because

    x_{k-1} = (x_{k+1} - alpha * x_k - R_k(x_k)) / beta,

the stage only keeps its last two states ``(x_{n-1}, x_n)``. Its graph is one ``_UnitStep`` node
per unit; walking the units in reverse, each step's backward (``_step_backward``) recomputes its
``R_k`` once and uses that one recompute both to rebuild the previous state and for the
vector-Jacobian product. See NOTE [ Stage backward ].
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from itertools import compress
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from . import _exact, _fsdp, _fused, _mode
from ._compile import CompiledUnit, compiled_units, scratch_stats, stat_slots
from ._direct import UnitProgram
from ._replay import (
    MISMATCH_CAUSES,
    TRAINING,
    VERSION,
    BufferSnapshot,
    BufferWatch,
    MismatchOptions,
    Owners,
    Recompute,
    RecomputeCheck,
    UncachedCasts,
    _ForwardState,
    check_modes,
    check_same_tensors,
    forward_hooked,
    frozen_running_stats,
    hooked_globally,
    read_slots,
    refuse_compiled,
    report_mismatch,
    sampled,
    slots_of,
    vjp,
    warn_hooked,
)
from .checkpoint import Segment

__all__ = ["ReversibleStage"]

_NULL = contextlib.nullcontext()  # a context that does nothing, reusable


class _BranchUnit:
    """A unit whose residual branch is one module call: ``R(h) = module(h)`` (``x + self.f(x)``).

    Every unit has ``raw(h)`` and ``subtract_input``: ``R(h) = raw(h) - h`` when
    ``subtract_input``, else ``raw(h)``. The stage backward works with ``raw`` so that
    ``U(h) - h`` is never materialised as a separate tensor (NOTE [ Stage backward ]).
    """

    subtract_input = False
    # its raw compiled by revify.compile_units (NOTE [ Regional compile ] in _compile.py)
    compiled: CompiledUnit | None = None
    # Positions (in _replay.state_slots) of the buffers its forward was seen to write; None
    # before its first recorded call (NOTE [ Buffers a forward writes ]).
    written: frozenset[int] | None = None
    # The unit writes its input in place (``h += self.f(h)``): it gets a copy, since its input
    # is a stream state of the stage (see ``_inplace.py``).
    copy_input = False

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.modules = [module]
        self.pattern = ""  # the residual pattern matched, for reports

    def owners(self) -> Owners:
        """Where the unit reads its tensors (``_replay.slots_of``: its parameter and buffer
        slots, the buffers it may write, its BatchNorms)."""
        return Owners([self.module])

    def named_roots(self) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` under which the modules it calls are named in reports."""
        return [(self.name, self.module)]

    def raw(self, h: Tensor) -> Tensor:
        return self.module(h.clone() if self.copy_input else h)

    # what revify.compile_units compiles: raw without the checks that would break its graph
    # (NOTE [ Regional compile ] in _compile.py)
    plain = raw

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

    def slot(self) -> tuple[nn.Module, str]:
        """The module holding the attribute, and its name there."""
        owner, _, name = self.target.rpartition(".")
        return self.root.get_submodule(owner), name


class _Reads:
    """Where generated code reads its parameters and buffers: the modules it calls and the
    attributes it fetches, looked up by path, like the code itself does, whenever the slots
    are recomputed (NOTE [ Slot cache ] in _replay.py). A module replaced after conversion is
    then the one that is differentiated, not the one conversion saw."""

    def __init__(self, root: nn.Module, module_paths: Sequence[str], attr_paths: Sequence[str]):
        self.root = root
        self.module_paths, self.attr_paths = list(module_paths), list(attr_paths)

    def owners(self) -> Owners:
        return Owners(
            [self.root.get_submodule(p) for p in self.module_paths],
            [_Attr(self.root, p).slot() for p in self.attr_paths],
        )


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
    # the module's forward as code with direct submodule calls, where conversion could check
    # it (NOTE [ Direct calls ] in _direct.py); it calls the module itself where it must
    program: UnitProgram | None = None

    def __init__(
        self, name: str, module: nn.Module, args: tuple = (), kwargs: dict | None = None
    ) -> None:
        super().__init__(name, module)
        self.args, self.kwargs = args, dict(kwargs or {})
        attrs: list[Any] = [*args, *self.kwargs.values()]
        self._attrs = [a for a in attrs if isinstance(a, _Attr)]
        # the arguments as they are when none is looked up (_Attr) at the call
        self._fixed = None if self._attrs else (tuple(args), self.kwargs)

    def owners(self) -> Owners:
        return Owners([self.module], [a.slot() for a in self._attrs])

    def raw(self, h: Tensor) -> Tensor:
        h = h.clone() if self.copy_input else h
        if self.program is not None:
            return self.program(self.module, h)
        return self.plain(h, copy=False)

    def plain(self, h: Tensor, copy: bool = True) -> Tensor:
        h = h.clone() if copy and self.copy_input else h
        if self._fixed is not None:
            args, kwargs = self._fixed
            return self.module(h, *args, **kwargs)
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
        reads: _Reads,
        subtract_input: bool,
    ) -> None:
        self.name = name
        self.code = code
        self.root = root
        self.modules = modules
        self._reads = reads
        self.subtract_input = subtract_input
        self.pattern = ""

    def owners(self) -> Owners:
        return self._reads.owners()

    def named_roots(self) -> list[tuple[str, nn.Module]]:
        return [("", self.root)]  # its name is the residual's, its modules the root's

    def raw(self, h: Tensor) -> Tensor:
        return self.code(self.root, h.clone() if self.copy_input else h)

    plain = raw


def _grad_tensors(unit: Any) -> list[Tensor]:
    """The tensors ``unit`` reads that require grad, once each (from its cached slots,
    NOTE [ Slot cache ] in _replay.py)."""
    return read_slots(slots_of(unit).slots, grad_only=True)


def _stage_state_slots(stage: ReversibleStage) -> list[Any]:
    """The buffer slots the stage's units may write (``_replay.state_slots``)."""
    return [slot for u in stage.units for slot in slots_of(u).state]


def _stream_dtype(dtype: torch.dtype) -> torch.dtype:
    # NOTE: streams are never kept in half precision: bf16 unit outputs added to fp32 streams
    # subtract back almost exactly, bf16 streams gave 35-100 % gradient error (DESIGN.md §3).
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _combine(alpha: float, beta: float, x_prev: Tensor, x_cur: Tensor, r: Tensor) -> Tensor:
    """``beta * x_prev + alpha * x_cur + r``, skipping the terms whose coefficient is 0."""
    out = r if beta == 0 else torch.add(r, x_prev, alpha=beta)
    if alpha == 0:
        return out
    if out is not r and not torch.is_grad_enabled():
        return out.add_(x_cur, alpha=alpha)  # no second full-size temporary
    return torch.add(out, x_cur, alpha=alpha)


class ReversibleStage(MismatchOptions):
    """A chain of identity residual units run as a reversible two-stream coupling.

    Not an ``nn.Module``: it holds references to the units' modules, which stay where they are
    in the converted model, so ``state_dict()`` keys and ``Parameter`` objects do not change.

    Args:
        name: module path used in reports, e.g. ``"layer3"``.
        units: callables ``h -> R(h)``, each with ``.name`` and ``.modules``.
        alpha, beta: coupling coefficients. ``beta`` must be non-zero (the inverse divides by it).

    Attributes:
        last_reconstruction_error: ``max|x_-1 - x_0| / max|x_0|`` (0-dim tensor, not
            synchronised) on a sample of the elements, after each checked backward (the first
            10, then every 50th; NOTE [ Reconstruction error ]): both are reconstructions of the
            stage input, so a large value means the coupling was not invertible in this
            precision.
        on_mismatch: ``"warn"`` (default), ``"raise"`` or ``"ignore"``: what a backward does
            when a unit's recompute differs from its forward (a unit drawing randomness from
            Python's ``random``, or changing state outside buffers), detected on the first 10
            backward passes and every 50th after; see NOTE [ Mismatch check ] in _replay.py.
        mismatch_tolerance: the relative difference above which that is reported (None: by
            precision, 1e-2 in float32).
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
        self.alpha = alpha
        self.beta = beta
        self.last_reconstruction_error: Tensor | None = None
        self.treatment = "reversible"
        self._unit_segments: list[Any] = []  # per unit, its Segment when checkpointed
        # Debug switch used by revify.check: keep a copy of the input (defeats the memory
        # saving) so the reconstruction error is measured against the true input.
        self.record_input = False

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not math.isfinite(float(value)):
            raise ValueError(f"revify: stage {self.name}: alpha must be finite, got {value}")
        self._alpha = float(value)

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        if not math.isfinite(float(value)):
            raise ValueError(f"revify: stage {self.name}: beta must be finite, got {value}")
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
    def treatment(self) -> str:
        """How a training forward runs the stage (NOTE [ Stage treatments ]): ``"reversible"``
        (stores two states, rebuilds the rest), ``"store"`` (ordinary autograd),
        ``"checkpoint"`` (stores each unit's input, recomputes one unit at a time), or
        ``"checkpoint:k"`` (the first k units checkpointed, the rest stored)."""
        return self._treatment

    @treatment.setter
    def treatment(self, value: str) -> None:
        self._checkpointed = _checkpointed_units(self.name, value, len(self.units))
        self._treatment = value

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
        return [_grad_tensors(u) for u in self.units]

    def tensors(self) -> list[Tensor]:
        """All tensors requiring grad read by the stage, once each (inputs of the function)."""
        flat: dict[int, Tensor] = {}
        for ts in self.unit_tensors():
            for t in ts:
                flat.setdefault(id(t), t)
        return list(flat.values())

    def __call__(self, x: Tensor, side: Any = None, taps: Sequence[int] = ()) -> Any:
        """``x_n`` from the stage input ``x``. ``side`` (units that take it: a Hugging Face
        layer's attention mask and position embeddings) is handed to every unit call, forward
        and backward, as ``unit.raw(h, side)``; the walk keeps it for the backward.

        With ``taps`` (state indices ``0 < j < n``), returns ``(x_n, x_j, ...)``: the states
        code outside the stage reads (NOTE [ Taps ])."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"revify: stage {self.name} expects a floating-point tensor, got "
                f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}"
            )
        if taps:
            n = len(self.units)
            bad = [j for j in taps if not 0 < j < n]
            if bad:
                raise ValueError(
                    f"revify: stage {self.name} has states x_1..x_{n - 1} to tap, not {bad}"
                )
            tapped: dict[int, Tensor] = {}
            out = self._call(x, side, tapped, frozenset(taps))
            return (out, *(tapped[j] for j in taps))
        return self._call(x, side, None, frozenset())

    def _call(self, x: Tensor, side: Any, tapped: dict[int, Tensor] | None,
              taps: frozenset[int]) -> Tensor:
        if self._treatment != "reversible":  # NOTE [ Stage treatments ]
            return _forward(self, x, None, side, None, tapped, taps)
        if torch.is_grad_enabled() and not _mode.is_plain() and self._hooked():
            with _mode.plain_autograd():  # NOTE [ Forward hooks inside stages ] in _replay.py
                return _forward(self, x, None, side, None, tapped, taps)
        fsdp = []
        if _fsdp.active() and torch.is_grad_enabled() and not _mode.is_plain():  # NOTE [ FSDP2 ]
            fsdp = [_fsdp.driven(_fsdp.states_of(u, slots_of(u).slots), f"stage {self.name}")
                    for u in self.units]
        if not any(fsdp):
            unit_tensors = self.unit_tensors()
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(unit_tensors))
            if needs_grad and not _mode.is_plain():
                self._refuse_compiled()
            return _forward(
                self, x, unit_tensors if needs_grad and not _mode.is_plain() else None, side,
                None, tapped, taps,
            )
        self._refuse_compiled()
        for u in compiled_units(self.units):  # NOTE [ Regional compile ] in _compile.py
            raise RuntimeError(
                f"revify: stage {self.name}, unit {u.name}: units compiled by "
                "revify.compile_units cannot be driven by FSDP2's fully_shard (its unshard "
                "replaces the parameters the graph reads); use one of the two "
                "(revify.revert(model) and convert again drops compile_units)"
            )
        states = list({id(s): s for ss in fsdp for s in ss}.values())
        _fsdp.unshard(states)
        try:
            with _fsdp.hooks_pass_through(states):
                return _forward(self, x, self.unit_tensors(), side, fsdp, tapped, taps)
        finally:
            _fsdp.reshard(states)

    def _hooked(self) -> bool:
        """Whether a unit calls a module with a forward hook, warned once (NOTE [ Forward hooks
        inside stages ] in _replay.py)."""
        hooked = hooked_globally()  # once for all units
        for u in self.units:
            found = "global" if hooked else forward_hooked(slots_of(u).modules, True)
            if found is not None:
                warned = self.__dict__.setdefault("_hook_warned", set())
                warn_hooked(f"stage {self.name}", found, u.named_roots(), warned)
                return True
        return False

    def _refuse_compiled(self) -> None:
        for u in self.units:  # NOTE [ Compiled units ] in _replay.py
            refuse_compiled(f"stage {self.name}, unit {u.name},", slots_of(u))

    def unit_segment(self, k: int) -> Segment:
        """Unit k's step of the recurrence as a checkpointed :class:`Segment`, made once."""
        while len(self._unit_segments) <= k:
            j = len(self._unit_segments)
            unit = self.units[j]
            # the step's code ignores its root; a unit may call no module (``x + self.a * x``)
            root = unit.modules[0] if unit.modules else getattr(unit, "root", None)
            self._unit_segments.append(Segment(
                f"{self.name}:{unit.name}", _CheckpointedStep(j), root, unit.modules,
                unit, checkpoint=True, calls=[unit.name],
            ))
        seg = self._unit_segments[k]
        seg.on_mismatch, seg.mismatch_tolerance = self.on_mismatch, self.mismatch_tolerance
        return seg

    def __repr__(self) -> str:
        extra = "" if self._treatment == "reversible" else f", treatment={self._treatment!r}"
        return (
            f"ReversibleStage({self.name!r}, units={len(self.units)}, "
            f"alpha={self.alpha}, beta={self.beta}, exact={self.exact}{extra})"
        )


# NOTE [ Stage treatments ]
# A stage's treatment changes what its training forward stores, never what it computes: every
# treatment evaluates the same coupled recurrence (the exact streams' grid included), so a plan
# mixing treatments has the gradients of plain_autograd() and a checkpoint trained under one
# plan loads under another. "reversible" is the chain of step nodes below; "store" is the
# recurrence under ordinary autograd (what plain_autograd() runs); "checkpoint" runs each
# unit's step as a Segment of its own (checkpoint.py), which stores the step's inputs
# (x_{k-1}, x_k), and rebuilds the step in backward with the forward's random numbers and
# BatchNorm statistics, as the segments between stages do. Consecutive steps share their
# states, so a checkpointed stage keeps about one state per unit, as timm's per-block
# checkpointing does. The planner (planner.py) picks a treatment per stage under a budget.

TREATMENTS = ("reversible", "checkpoint", "store")


def _checkpointed_units(stage: str, treatment: Any, n_units: int) -> int:
    """How many leading units ``treatment`` checkpoints; raises for an unknown treatment."""
    if treatment in TREATMENTS:
        return n_units if treatment == "checkpoint" else 0
    kind, _, count = str(treatment).partition(":")
    if kind == "checkpoint" and count.isdigit() and 0 <= int(count) <= n_units:
        return int(count)
    raise ValueError(
        f"revify: stage {stage}: unknown treatment {treatment!r}; use 'reversible', 'store', "
        f"'checkpoint' or 'checkpoint:k' with 0 <= k <= {n_units} (its number of units)"
    )


class _CheckpointedStep:
    """Step k of a stage as a Segment's code: ``(root, walk, x_{k-1}, x_k) -> x_{k+1}``, on the
    walk's grid and coefficients, writing into none of its inputs (the Segment keeps them)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, root: nn.Module, walk: _Walk, x_prev: Tensor, x_cur: Tensor) -> Tensor:
        step = copy.copy(walk)
        step.pair = (x_prev, x_cur)
        step.compiled_ok = False  # a Segment's recompute freezes BatchNorm: eager units
        step.extrema = []
        step.advance(self.k, own=False)
        return step.pair[1]


class _Walk:
    """One stage forward and its backward: the coefficients they run with and the two newest
    states, ``(x_{k-1}, x_k)`` before forward step k and ``(x_k, x_{k+1})`` before backward step k.

    The graph of a stage is a chain of :class:`_UnitStep` nodes, one per unit, closed by a
    :class:`_StageEnd` node; the walk is what they share, since the states travel outside the
    graph (only ``_StageEnd`` saves tensors; NOTE [ Stage backward ]).
    """

    check: RecomputeCheck | None = None  # this pass's NOTE [ Mismatch check ], set by _run
    fsdp: list[list[Any]] | None = None  # per unit, the FSDP states it drives (_fsdp.py)
    # compiled units (NOTE [ Regional compile ] in _compile.py): whether they run compiled, and
    # inside a step's forward whether its h requires grad (None: outside one)
    compiled_ok = True
    dx: bool | None = None

    def __init__(
        self, stage: ReversibleStage, x: Tensor, grid: _exact.Grid | None, side: Any = None,
        entered: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> None:
        self.stage = stage
        self.side = () if side is None else (side,)  # extra argument of every unit call
        self.in_dtype = x.dtype
        # The coefficients of this forward: a schedule may change the stage's before backward.
        self.alpha, self.beta, self.exact = stage.alpha, stage.beta, grid is not None
        self.d = stage.divisor
        self.grid = grid
        # (x_k, x_k in the input's dtype) when a fused step made that copy with x_k: the unit
        # reads it instead of casting x_k again (NOTE [ Fused streams ] in _fused.py)
        self.half: tuple[Tensor, Tensor] | None = None
        if grid is None:
            x0 = x.to(_stream_dtype(x.dtype))
        else:
            # x_0 on the grid and max |x_0|, then of every state a fused step makes: from the
            # fused entry (``entered``, by _run_exact) or op by op
            if entered is None:
                on, self.accumulator = _fused.enter(x.detach(), grid, _stream_dtype(x.dtype))
                half = None
            else:
                on, self.accumulator, half = entered
            x0 = _straight_through(x.to(on.dtype), on) if x.requires_grad else on
            if half is not None and not x.requires_grad:
                self.half = (x0, half)
            self.extrema = []  # (min, max) of each state made op by op, checked at the end
        self.pair: tuple[Tensor, Tensor] | None = (x0, x0)
        self.owned = (False, False)  # backward: whether a step may write into each of pair
        self.reference: Tensor | None = None  # revify.check: the true input
        self.tapped: dict[int, Tensor] = {}  # x_j read outside the stage (NOTE [ Taps ])
        self.prev_tapped = False  # the tap of x_{n-1} is the memory _StageEnd saves

    @property
    def top(self) -> Tensor:
        """``max |state|`` over the states so far (exact mode), 0-dim."""
        if not self.extrema:
            return self.accumulator
        return torch.maximum(self.accumulator, _exact.top(self.extrema))

    def advance(self, k: int, own: bool = True) -> _exact.Packed | None:
        """Forward step k: ``pair`` becomes ``(x_k, x_{k+1})``; returns the packed remainders of
        ``(x_{k-1} - x_k) / d`` that the inverse needs (exact mode), else None. Without grad
        the step writes into ``x_{k-1}``'s memory unless ``own`` is False."""
        unit = self.stage.units[k]
        x_prev, x_cur = self.pair
        half, self.half = self.half, None
        h = half[1] if half is not None and half[0] is x_cur else x_cur.to(self.in_dtype)
        del half
        # a half-precision u is added to the fp32 streams by type promotion
        compiled = getattr(unit, "compiled", None) if self.compiled_ok else None
        if compiled is None:
            u = unit.raw(h, *self.side)
        elif self.dx is None:
            u = compiled(unit, h, self.side)
        else:  # inside a step's forward: the graph its recompute runs
            u = compiled.forward(unit, h, self.side, self.dx)
        a, m = _step_terms(self.alpha, unit, x_cur, h)
        rem = None
        if self.grid is None:
            x_next = _combine(a, self.beta, x_prev, x_cur, u)
            if m is not None:
                x_next = x_next - m if torch.is_grad_enabled() else x_next.sub_(m)
        else:
            grad = torch.is_grad_enabled()
            outer, inner = _exact.coefficients(a, self.beta, self.d)
            # plain autograd: the exact value, the float step's gradient
            value = None
            if grad:
                value = _combine(a, self.beta, x_prev, x_cur, u if m is None else u - m)
            # Without grad (no-grad path, or inside _UnitStep.forward) u and x_{k-1} are ours:
            # x_{k+1} is formed in x_{k-1}'s memory (fused) or in u's, D = x_{k-1} - x_k in
            # x_{k-1}'s (op by op).
            own_prev = own and not grad and k > 0
            # the next unit's bf16 input, made with x_{k+1} (not for the last: _StageEnd
            # splits x_n) where no graph needs the cast
            half = (not grad and self.in_dtype == torch.bfloat16
                    and k + 1 < len(self.stage.units))
            # no grad for the streams' arithmetic (already off inside a step's forward)
            with torch.no_grad() if grad else _NULL:
                fused = _fused.next_state(
                    self.grid, self.d, outer, inner, _values(u), _values(m), _values(x_prev),
                    _values(x_cur), own_prev, k == 0, self.accumulator, half,
                )
                if fused is None:
                    t = _exact.rounded(
                        u.detach(), None if m is None else m.detach(), x_cur.detach(), inner,
                        self.grid, own=not grad and not _is_alias(u, h, x_cur),
                    )
            del u, h, m  # in half precision a state's worth: gone before the states' arithmetic
            with torch.no_grad() if grad else _NULL:
                if fused is None:
                    x_next, rem = _exact.next_state(
                        self.grid, self.d, outer, t, x_prev.detach(), x_cur.detach(),
                        own_prev=own_prev, first=k == 0,
                    )
                    del t
                    self.extrema.append(self.grid.extrema(x_next))
                else:
                    x_next, rem, h_next = fused
                    del fused
                    if h_next is not None:
                        self.half = (x_next, h_next)
            if value is not None:
                x_next = _straight_through(value, x_next)
        self.pair = (x_cur, x_next)
        return rem


def _values(t: Tensor | None) -> Tensor | None:
    """``t.detach()``, without the op when ``t`` has no graph (inside a step's forward)."""
    return t.detach() if t is not None and t.requires_grad else t


def _coefficient(alpha: float, unit: Any) -> float:
    """The derivative of step k in ``x_k`` beside that through the unit (``- id`` folded in)."""
    return alpha - 1.0 if unit.subtract_input else alpha


def _step_terms(alpha: float, unit: Any, x_cur: Tensor, h: Tensor) -> tuple[float, Tensor | None]:
    """``(a, m)`` with step k written ``x_{k+1} = beta x_{k-1} + a x_k + u - m``, where
    ``u = unit.raw(h)`` and ``h`` is ``x_k`` in the unit's dtype.

    For ``R_k = U_k - id`` the ``- id`` is folded into ``a`` when ``h`` is ``x_k`` itself, so that
    no ``U_k(h) - h`` temporary is formed and rebuilding writes into no tensor the vjp needs. In
    half precision it takes the rounded ``h`` instead (``m = h``): ``x_k`` then enters the step
    only through ``h``, and errors of a rebuilt ``x_k`` below ``h``'s precision do not propagate
    (subtracting the fp32 ``x_k`` raised ResNet-152's bf16 reconstruction error from 1e-2 to 0.6).
    """
    if not unit.subtract_input or h.dtype == x_cur.dtype:
        return _coefficient(alpha, unit), None
    return alpha, h


def _forward(
    stage: ReversibleStage, x: Tensor, unit_tensors: list[list[Tensor]] | None, side: Any = None,
    fsdp: list[list[Any]] | None = None, tapped: dict[int, Tensor] | None = None,
    taps: frozenset[int] = frozenset(),
) -> Tensor:
    """The coupled recurrence, ``x_n``. Given each unit's tensors requiring grad it is run by
    step nodes that store nothing (the reversible path); without, by ordinary differentiable
    ops (plain or no-grad). The states ``x_j``, ``j in taps``, are put in ``tapped``."""
    graph = unit_tensors is not None
    # A stage of one unit keeps both its states (x_0, x_1) and rebuilds nothing: it needs no
    # grid, and so computes x_0 + R_0(x_0) without rounding, as the original unit does.
    if stage.exact and len(stage.units) > 1:
        walk, tokens = _run_exact(stage, x, unit_tensors, side, fsdp, taps)
    else:
        walk, tokens = _run(stage, x, None, unit_tensors, side, fsdp, taps=taps)
    if tapped is not None:
        tapped.update(walk.tapped)
        walk.tapped = {}
    if not graph:
        return _output(walk.pair[1], x.dtype)
    if stage.record_input:  # exact streams start from the input rounded onto their grid
        ref = x.detach().to(walk.pair[1].dtype)
        walk.reference = _exact.on_grid(ref, walk.grid.delta) if walk.exact else ref.clone()
    return _StageEnd.apply(walk, *tokens)


def _run_exact(
    stage: ReversibleStage, x: Tensor, unit_tensors: list[list[Tensor]] | None, side: Any = None,
    fsdp: list[list[Any]] | None = None, taps: frozenset[int] = frozenset(),
) -> tuple[_Walk, tuple[Tensor, Tensor] | None]:
    """:func:`_run` on a grid chosen for this forward (NOTE [ Exact streams ]): redone, with the
    same random draws and BatchNorm statistics already updated, while the states outgrow it."""
    start = _ForwardState(x.device)
    # a compiled unit's graph updates its BatchNorm statistics: put back before a redo
    compiled = list(compiled_units(stage.units))
    kept = BufferSnapshot(_stage_state_slots(stage)
                          + [s for u in compiled for s in stat_slots(slots_of(u).bns)])
    dtype = _stream_dtype(x.dtype)
    # the first grid and x_0 on it in two kernels where the fused ops run (NOTE [ Fused streams ]
    # in _fused.py); the bf16 copy of x_0 for unit 0 unless a graph needs the cast
    half = x.dtype == torch.bfloat16 and (unit_tensors is not None or not x.requires_grad)
    entry = _fused.entry(x.detach(), dtype, half)
    grid = _exact.first_grid(x.detach(), dtype) if entry is None else entry[0]
    entered = None if entry is None else entry[1:]
    del entry
    for attempt in range(3):
        if attempt:  # other buffers as before the first pass (NOTE [ Buffers a forward writes ])
            start.restart()
            kept.restore()
        bns = [bn for u in stage.units if getattr(u, "compiled", None) is None
               for bn in slots_of(u).bns] if attempt else []
        with frozen_running_stats(bns):
            walk, tokens = _run(stage, x, grid, unit_tensors, side, fsdp, entered, taps)
        entered = None
        top = walk.top
        grid = _exact.regrid(x.detach(), walk.grid, top)
        if grid is None:
            return walk, tokens
        del walk, tokens  # before the redo allocates its own
    raise RuntimeError(
        f"revify: stage {stage.name}: exact streams outgrew their fixed-point grid three times "
        f"(largest state {float(top):.3g}); use exact=False (coupling='revnet') for it"
    )


def _run(
    stage: ReversibleStage,
    x: Tensor,
    grid: _exact.Grid | None,
    unit_tensors: list[list[Tensor]] | None,
    side: Any = None,
    fsdp: list[list[Any]] | None = None,
    entered: tuple[Tensor, Tensor, Tensor | None] | None = None,
    taps: frozenset[int] = frozenset(),
) -> tuple[_Walk, tuple[Tensor, Tensor] | None]:
    """One pass of the recurrence, on the fixed-point ``grid`` when given; with
    ``unit_tensors``, as a chain of step nodes whose last two outputs are returned. ``fsdp``:
    per unit, the FSDP states it drives (NOTE [ FSDP2 ] in _fsdp.py); ``entered``: x_0 on the
    grid as the fused entry made it (:class:`_Walk`); ``taps``: the states to put in
    ``walk.tapped`` (NOTE [ Taps ])."""
    if unit_tensors is None:
        walk = _Walk(stage, x, grid, side, entered)
        checkpointed = stage._checkpointed if torch.is_grad_enabled() and not _mode.is_plain() \
            else 0
        for k in range(len(stage.units)):
            if k >= checkpointed:
                walk.advance(k)
            else:
                x_prev, x_cur = walk.pair  # NOTE [ Stage treatments ]
                (x_next,) = stage.unit_segment(k)(walk, x_prev, x_cur)
                if grid is not None:
                    walk.extrema.append(grid.extrema(x_next.detach()))
                walk.pair, walk.half = (x_cur, x_next), None
            if k + 1 in taps:
                walk.tapped[k + 1] = _tap_value(walk.pair[1], walk.in_dtype)
        return walk, None
    walk = _Walk(stage, x.detach(), grid, side, entered)
    walk.check = RecomputeCheck.due(stage, x)
    tokens = (x, x)
    walk.fsdp = fsdp or [[] for _ in unit_tensors]
    seen: set[int] = set()
    with UncachedCasts():  # NOTE [ Uncached casts ] in _replay.py
        for k, tensors in enumerate(unit_tensors):
            first = [s for s in walk.fsdp[k] if id(s) not in seen]
            if first:  # the first unit reading a state: its gradients are complete after it
                seen.update(map(id, first))
                tokens = _fsdp.post_backward_on(first, tokens)
            tokens = _UnitStep.apply(walk, k, *tokens, *tensors)
            if k + 1 in taps:
                walk.tapped[k + 1] = _Tap.apply(tokens[1], walk, k + 2 == len(unit_tensors))
    return walk, tokens


# NOTE [ Taps ]
# Code outside a stage may read one of its intermediate states x_j (timm's
# forward_intermediates collects every block's output; a trunk returning a feature list): the
# stage then returns a copy of x_j in the input's dtype beside x_n, made by the forward right
# after step j-1, and the chain is not cut there (_match.chains). Read outside, x_j is the
# coupled recurrence's state, as x_n is: the value the converted function gives that read.
# The copy is the reader's, as the original activation was; the stage keeps nothing more. On the
# reversible path the copy is the output of a _Tap node on step j-1's token for x_j, so its
# gradient joins a_j before step j-1's backward runs (the engine waits for every output's
# gradient); a tap no loss reaches adds nothing. A reader writing into x_j in place would
# change the next unit's input in the original but not the copy: no tap then (_plan). x_{n-1}
# is saved by _StageEnd anyway: where it already has the input's dtype, the tap is that memory
# (no copy), and the backward then builds no other state in it (NOTE [ Saved states ]); a
# reader writing into it makes the backward raise, as for the stage output.


def _tap_value(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The state ``x`` as a tap: in ``dtype`` as the stage output is, and never ``x``'s memory
    (later steps may write into it)."""
    out = _output(x, dtype)
    return out.clone() if _is_alias(out, x) else out


class _Tap(torch.autograd.Function):
    """A copy of the state ``walk.pair[1]`` (x_j, just made by step j-1), read outside the
    stage; its gradient goes to step j-1's token for x_j (NOTE [ Taps ])."""

    @staticmethod
    def forward(ctx: Any, token: Tensor, walk: _Walk, saved: bool) -> Tensor:
        ctx.set_materialize_grads(False)
        x = walk.pair[1]
        out = _output(x, walk.in_dtype)
        if not _is_alias(out, x):
            return out
        if saved:  # x_{n-1}, kept by _StageEnd: hand out that memory, and keep it intact
            walk.prev_tapped = True
            return x.detach()
        return out.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor | None) -> tuple[Tensor | None, None, None]:
        return g, None, None


def _straight_through(value: Tensor, exact: Tensor) -> Tensor:
    """``exact`` in the forward, the gradient of ``value`` in the backward."""
    if not value.requires_grad:
        return exact
    return value + (exact - value).detach()


def _token(like: Tensor) -> Tensor:
    """A stand-in for a state in the graph: ``like``'s shape and dtype, one element of memory.

    The states themselves are fp32 streams kept by the walk; the graph carries their adjoints,
    which in the stage input's dtype are what plain autograd would hold (bf16 under autocast).
    """
    return torch.empty_strided(
        like.shape, (0,) * like.dim(), dtype=like.dtype, device=like.device
    )


# NOTE [ bf16 stage output ]
# Under bf16 autocast a stage returns x_n rounded to bf16, and the layer after it (a checkpointed
# transition) saves that copy. Saving the fp32 x_n beside it would store the same state twice,
# so _StageEnd saves the bf16 output and the int16 rest that completes it bit for bit. That
# needs every bf16 value to stand for at most 2^16 fp32 bit patterns, which round-to-nearest-even
# breaks (an even bf16 value is nearest to 2^16 + 1 of them: both ties), so the stage output
# rounds ties away from zero: on the bit pattern, hi = (bits + 2^15) >> 16, and the rest
# bits - hi * 2^16 lies in [-2^15, 2^15). It differs from ``x.to(torch.bfloat16)`` only on exact
# ties, by one bf16 ulp, and every path (no grad, plain autograd, reversible) rounds this way.


def _splits(in_dtype: torch.dtype, stream_dtype: torch.dtype) -> bool:
    """Whether a stage returning ``in_dtype`` from ``stream_dtype`` streams uses the split."""
    return in_dtype == torch.bfloat16 and stream_dtype == torch.float32


def _split_bf16(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, rest)`` for float32 ``x``: ``hi`` is ``x`` in bf16 (ties away from zero), ``rest``
    the int16 that :func:`_join_bf16` needs to give ``x`` back bit for bit (NaNs stay NaN); one
    kernel where the fused ops run (NOTE [ Fused streams ] in _fused.py)."""
    return _fused.split_bf16(x)


def _join_bf16(hi: Tensor, rest: Tensor) -> Tensor:
    """The float32 tensor that :func:`_split_bf16` split."""
    return _fused.join_bf16(hi, rest)


def _output(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The state ``x`` as the stage's output in ``dtype`` (NOTE [ bf16 stage output ])."""
    if not _splits(dtype, x.dtype):
        return x.to(dtype)
    hi = _exact.bf16_of(x.detach())
    return _straight_through(x.to(dtype), hi) if x.requires_grad else hi


class _UnitStep(torch.autograd.Function):
    """Unit k of a stage: ``(x_{k-1}, x_k) -> (x_k, x_{k+1})`` on tokens, saving nothing but
    the packed remainder of exact mode. Its backward is :func:`_step_backward`.

    Inputs are ``(walk, k, token_prev, token_cur, *tensors)`` where ``tensors`` are the unit's
    parameters and buffers that require grad: gradients are returned, never assigned, so
    ``torch.autograd.grad(loss, params)``, DDP hooks and frozen parameters all behave as with
    ordinary autograd, and each unit's gradients are handed over as soon as they exist.
    """

    @staticmethod
    def forward(
        ctx: Any, walk: _Walk, k: int, prev: Tensor, cur: Tensor, *tensors: Tensor
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.walk, ctx.k = walk, k
        ctx.tensor_ids = list(map(id, tensors))
        # FSDP2 writes the unsharded parameters again for the backward (NOTE [ FSDP2 ])
        ctx.tensor_versions = None if walk.fsdp and walk.fsdp[k] else list(map(VERSION, tensors))
        ctx.state = _ForwardState(cur.device)
        units = walk.stage.units
        unit, check = units[k], walk.check
        if check is not None and k == 0:
            check.record(0, walk.pair[1])
        slots = slots_of(unit)
        ctx.modes = list(map(TRAINING, slots.modules))  # check_modes in backward
        watch = BufferWatch(slots.state, unit.written)
        ctx.layout = walk.pair[1].stride()  # x_k as unit k reads it (NOTE [ Recompute layout ])
        walk.dx = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        rem = walk.advance(k)
        compiled = getattr(unit, "compiled", None)
        if compiled is not None:  # NOTE [ Regional compile ] in _compile.py
            ctx.compiled_kind = compiled.kind
        ctx.written, unit.written = watch.written()
        if check is not None and k + 1 <= len(units) - 2:  # x_{n-1}, x_n are kept, not rebuilt
            check.record(k + 1, walk.pair[1])
        if rem is not None:
            ctx.order = rem.order  # the memory order the remainders follow
            ctx.save_for_backward(rem.data)
        return _token(cur), _token(cur)

    @staticmethod
    def backward(ctx: Any, g_cur: Tensor | None, g_next: Tensor | None) -> tuple[Any, ...]:
        unit = ctx.walk.stage.units[ctx.k]
        if torch.is_grad_enabled():  # the backward of a create_graph=True backward
            raise RuntimeError(
                f"revify: stage {ctx.walk.stage.name}, unit {unit.name}: higher-order gradients "
                "(torch.autograd.grad(..., create_graph=True), gradient penalties) are not "
                "supported through a reversible stage: its states are rebuilt outside the graph; "
                "use revify.plain_autograd() for steps that need higher-order gradients, or "
                "revify.revert(model)"
            )
        if torch._C._autograd._profiler_enabled():  # a label, only where a profiler runs
            with torch.profiler.record_function(f"revify.stage_backward: {unit.name}"):
                return _step_backward(ctx, g_cur, g_next)
        return _step_backward(ctx, g_cur, g_next)


class _StageEnd(torch.autograd.Function):
    """Closes a stage: returns ``x_n`` in the input's dtype and saves ``(x_{n-1}, x_n)``, the
    only activations a stage stores. Its backward hands them to the walk."""

    @staticmethod
    def forward(ctx: Any, walk: _Walk, prev: Tensor, cur: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.walk = walk
        x_prev, x_cur = walk.pair
        walk.pair = None  # saved below, where saved-tensor hooks (offloading) see them
        if _splits(walk.in_dtype, x_cur.dtype):  # NOTE [ bf16 stage output ]
            out, rest = _split_bf16(x_cur)
            ctx.save_for_backward(x_prev, out, rest)
        else:
            out = x_cur.to(walk.in_dtype)
            ctx.save_for_backward(x_prev, x_cur)
        return out

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None) -> tuple[Tensor | None, ...]:
        walk = ctx.walk
        try:
            saved = ctx.saved_tensors
        except RuntimeError as e:
            if "modified by an inplace operation" not in str(e):
                raise  # e.g. a second backward through a graph already freed
            raise RuntimeError(
                f"revify: stage {walk.stage.name}: its output (or the state x_{{n-1}} it "
                "handed out) was modified in place after the stage; the stage keeps it as part "
                "of its state for the backward (clone it before modifying it)"
            ) from e
        # x_{n-1} is a state the walk made (a stage of two units or more), seen by no one else
        # once this graph is freed: step n-2 may then rebuild x_{n-3} in its memory, so the
        # walk holds two states, not three (NOTE [ Saved states ]); not where it was handed
        # out as a tap (NOTE [ Taps ])
        own_prev = len(walk.stage.units) > 1 and not _keeps_graph() and not walk.prev_tapped
        if len(saved) == 3:  # x_n rebuilt from its halves: a tensor of ours
            x_prev, out, rest = saved
            walk.pair, walk.owned = (x_prev, _join_bf16(out, rest)), (own_prev, True)
        else:  # x_n is the stage's output too: never ours
            walk.pair, walk.owned = saved, (own_prev, False)
        return None, None, g_out


# NOTE [ Saved states ]
# _StageEnd saves x_{n-1} and x_n. Backward step n-1 rebuilds x_{n-2} into x_n's memory (when
# x_n was rejoined from its bf16 halves) and step n-2 rebuilds x_{n-3} into x_{n-1}'s. The
# second is safe only when nothing else can read x_{n-1} afterwards: a backward that keeps the
# graph (retain_graph=True) reads the saved x_{n-1} again, so there a fresh tensor is made, as
# it always was before (three stage-sized states alive through step n-2's vjp: the simulated
# bf16 ResNet-50 peak was 1036 MiB, in layer2, with the third, and is 1017 MiB without, now in
# layer1's backward). x_{n-1} is
# never the stage input or output: a stage of one unit keeps x_0 as x_{n-1}, and it is not
# written.


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True when torch
    cannot say, so nothing saved is ever written."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def _is_alias(t: Tensor, *others: Tensor | None) -> bool:
    st = t.untyped_storage()._cdata
    for o in others:
        if o is not None and o.untyped_storage()._cdata == st:
            return True
    return False


def _step_backward(ctx: Any, g_cur: Tensor | None, g_next: Tensor | None) -> tuple[Any, ...]:
    """The backward of unit k: rebuilds ``x_{k-1}`` and returns the adjoints of the step."""
    # NOTE [ Stage backward ]
    # Step k receives the adjoints a_k (partial: only what reached x_k through step k+1's
    # pass-through) and a_{k+1}, and finds x_k, x_{k+1} in the walk. One recompute u = U_k(x_k)
    # (R_k = U_k, or U_k - id folded into the coefficient a of x_k) with grad gives both
    #   x_{k-1} = (x_{k+1} - a x_k - u) / beta   (into x_{k+1}'s memory when it is ours) and
    #   (dx_k, dtheta_k) = u'^T a_{k+1},  then a_{k-1} = beta a_{k+1}, a_k += a a_{k+1} + dx_k.
    # The reconstruction comes first and the vjp starts from u's gradient edge, not from u,
    # so u's memory is freed as soon as the vjp is past the op that made it. Tensors we
    # allocated are updated in place; saved tensors and autograd's grads are never written.
    # Only _StageEnd saves states, so x_n and x_{n-1} are freed once the walk moves past them,
    # and the engine hands each unit's parameter gradients on right after its step.
    walk: _Walk = ctx.walk
    k, stage = ctx.k, walk.stage
    unit = stage.units[k]
    if walk.pair is None:
        raise RuntimeError(
            f"revify: stage {stage.name}: backward reached unit {k} without the states of the "
            "unit after it (was part of the graph backpropagated separately?)"
        )
    mid, hi = walk.pair  # x_k, x_{k+1}
    hi_owned = walk.owned[1]
    walk.pair = None
    need_dx = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    driven = walk.fsdp[k] if walk.fsdp else []
    _fsdp.pre_backward(driven)  # NOTE [ FSDP2 ] in _fsdp.py: unsharded before they are read
    slots = slots_of(unit)
    tensors = read_slots(slots.slots, grad_only=True)
    needs = ctx.needs_input_grad[4:]
    what = f"stage {stage.name}, unit {unit.name}"
    check_same_tensors(what, ctx.tensor_ids, tensors, ctx.tensor_versions)
    check_modes(what, ctx.modes, slots)
    beta = walk.beta

    h = _as_read(mid.detach().to(walk.in_dtype), ctx.layout)
    a, m = _step_terms(walk.alpha, unit, mid, h)
    probe = None
    if k == 0:
        # No step needs x_{-1}: unit 0 only measures the reconstruction error, on checked
        # passes (NOTE [ Reconstruction error ]), so x_1 is dropped before the recompute.
        if walk.check is not None or walk.reference is not None:
            probe = _Probe(walk, hi, mid)
        hi = None
    compiled = getattr(unit, "compiled", None)
    # this unit's BatchNorms frozen: NOTE [ Slot cache ]. A compiled unit's graph updates them,
    # on copies, and takes every parameter (NOTE [ Regional compile ] in _compile.py)
    bns, written, asked = slots.bns, ctx.written, needs
    if compiled is not None:
        bns, written, asked = (), [*written, *scratch_stats(slots.bns)], (True,) * len(needs)
    with Recompute(what, ctx.state, bns, written, slots.slots, tensors, asked) as leaves:
        h.requires_grad_(need_dx)
        if compiled is None:
            u = unit.raw(h, *walk.side)
        else:
            u = compiled.recompute(what, unit, h, walk.side, ctx.compiled_kind)
    every = all(needs)
    wanted = leaves if every else list(compress(leaves, needs))
    del leaves
    with torch.no_grad():
        m = None if m is None else m.detach()
        lo = None
        if probe is not None:
            probe.record(u, m, a)
            del probe
        elif k > 0 and need_dx:  # earlier steps will run: rebuild x_{k-1}
            if walk.exact:
                packed = None
                if walk.d > 1:
                    packed = _exact.Packed(ctx.saved_tensors[0], ctx.order)
                lo = _fused.prev_state(
                    walk.grid, walk.d, *_exact.coefficients(a, beta, walk.d), u.detach(), m,
                    mid, hi, packed, own_next=hi_owned,
                )
                del packed
            else:
                lo = _rebuild(hi, u, mid, a, m, beta, inplace=hi_owned)
        del hi, m
        if walk.check is not None:  # NOTE [ Mismatch check ] in _replay.py
            if lo is not None:
                walk.check.compare(k - 1, lo)
            elif k == 0:
                _judge(walk)
    inputs = ([h] if need_dx else []) + wanted
    grads: Sequence[Tensor | None] = (None,) * len(inputs)
    # R_k = U_k - id with U_k ending in its shortcut's add: the - id cancels that add's pass to
    # h, dropped from the vjp instead of subtracted after it (NOTE [ Unit shortcut ])
    dropped = False
    if g_next is not None and u.requires_grad:
        dropped = unit.subtract_input and need_dx and _drop_shortcut(u, h)
        out = get_gradient_edge(u) if u.grad_fn is not None else u
        g = g_next.to(u.dtype)
        del u, h
        grads = vjp([out], inputs, [g])
        del out, g
    else:
        del u, h
    it = iter(grads[len(inputs) - len(wanted):])
    grads_out = list(it) if every else [next(it) if need else None for need in needs]
    if not need_dx:
        return (None, None, None, None, *grads_out)
    if k > 0:
        walk.pair, walk.owned = (lo, mid), (True, walk.owned[0])
    del lo, mid
    # a_{k-1} = beta a_{k+1};  a_k += a a_{k+1} + dx_k, in dx_k's memory (the vjp made it).
    # a_{k-1} is handed on unscaled, as a_{k+1} itself: its only reader is step k-1 (as its
    # g_cur), which applies beta when it adds it in, so no scaled copy of a state is made.
    dx = grads[0]
    del grads, it
    if dx is not None and _is_alias(dx, g_next, g_cur):
        dx = dx.clone()  # a pass-through branch can hand back a_{k+1} itself: never alias it
    # Step 0's two inputs are both the stage input x: dL/dx = a_0 + a_{-1}, summed here.
    alpha = walk.alpha if dropped else _coefficient(walk.alpha, unit)
    terms = [(t, c) for t, c in ((g_cur, beta), (g_next, alpha + beta if k == 0 else alpha))
             if t is not None and c != 0]
    dx = _adjoint_sum(dx, terms, _stream_dtype(walk.in_dtype), walk.in_dtype)
    g_prev = None if k == 0 else g_next  # beta * g_prev is the true a_{k-1}
    return (None, None, g_prev, dx, *grads_out)


def _adjoint_sum(
    dx: Tensor | None, terms: list[tuple[Tensor, float]], stream: torch.dtype, out: torch.dtype
) -> Tensor | None:
    """``dx + sum(coef * term)`` in ``out`` (the adjoints' dtype), summed in the ``stream``
    dtype as ordinary autograd sums the streams' adjoints, and in ``dx``'s memory when ``dx``
    (made by the vjp) has that dtype. Under autocast the vjp of a bf16 ``h`` is bf16: the sum is
    then rounded to bf16 once, not at every term (in one kernel where the fused op runs: NOTE
    [ Fused streams ] in _fused.py)."""
    fused = _fused.adjoint_sum(dx, terms, stream, out)
    if fused is not None:
        return fused
    return _fused.adjoint_sum_ops(dx, terms, stream, out)


# NOTE [ Unit shortcut ]
# A module unit holds its own shortcut, U(h) = h + F(h), and R(h) = U(h) - h, so the vjp of
# step k sends a_{k+1} to h through the shortcut and the step's coefficient alpha - 1 takes it
# back. Summed that way, (a + F'^T a) - a, the rounding of a + F'^T a (eps |a|) lands on
# F'^T a, which can be far smaller than a: the adjoint of x_{n-1}, which no other step reaches,
# is F'^T a alone. ConvNeXt's 2-unit stages make that unit 0's input, and its parameter
# gradients were 2.5-8x less accurate than plain autograd's in fp32 and 15-37x under bf16
# autocast (there h, and so the vjp, is bf16, and every unit before another lost precision,
# ~2x; tests/test_unit_accuracy.py).
# Ordinary autograd cancels a - a exactly: the step's - a reaches h first. When the unit's last
# op is that add (h + F(h), alpha 1, one operand h itself), _drop_shortcut drops its gradient to
# h from the vjp, so the vjp returns F'^T a, and the step's coefficient is alpha. This costs
# nothing (putting - a into h's gradient first, as autograd does, kept one more full-size tensor
# through every vjp: +12 % simulated peak on ResNet-50). Units ending otherwise (ResNet's
# relu(h + F(h)), a ViT block's two adds) keep the subtraction: their a - a cancels only where
# the ReLU passes, or beside a second branch's gradient, and measured as accurate as plain.


def _drop_shortcut(u: Tensor, h: Tensor) -> bool:
    """If ``u = h + F(h)`` by its last op, make that op send no gradient to ``h``; whether done."""
    node = u.grad_fn
    if node is None or node.name() != "AddBackward0" or getattr(node, "_saved_alpha", 1) != 1:
        return False
    edges = [
        i for i, (fn, _) in enumerate(node.next_functions)
        if fn is not None and getattr(fn, "variable", None) is h
    ]
    if len(edges) != 1:  # h + h, or a shortcut through some op of its own
        return False
    (i,) = edges

    def drop(grad_inputs: tuple[Tensor | None, ...], _: Any) -> tuple[Tensor | None, ...]:
        return tuple(None if j == i else g for j, g in enumerate(grad_inputs))

    node.register_hook(drop)
    return True


# NOTE [ Recompute layout ]
# A rebuilt state takes the memory layout of the tensor it is computed in (x_{k+1}'s, or what
# the elementwise ops choose), which can differ from the layout the forward gave x_k: a unit
# returning f(h) + h with f(h) a permuted view (a channel LayerNorm) makes x_{k+1} channels-last
# while x_k was contiguous. The recompute must read x_k as the forward did: dropout draws its
# mask in memory order, so the replayed RNG gave another mask in another layout (gradients 0.43
# off in float64, silently), and kernels may round differently. The step records the strides
# its unit read and the backward copies a state into them when they differ (not for the usual
# contiguous models, where the layouts agree).


def _as_read(h: Tensor, stride: tuple[int, ...]) -> Tensor:
    """``h`` with the strides the forward's unit read (``stride``), copied only if needed."""
    now = h.stride()
    if now == stride or all(n == 1 or a == b for n, a, b in zip(h.shape, now, stride,
                                                                 strict=True)):
        return h
    out = torch.empty_strided(h.shape, stride, dtype=h.dtype, device=h.device)
    return out.copy_(h)


def _rebuild(
    x_next: Tensor, u: Tensor, x_k: Tensor, a: float, m: Tensor | None, beta: float, inplace: bool
) -> Tensor:
    """``x_{k-1} = (x_{k+1} - u + m - a x_k) / beta``, the inverse of one forward step
    (:meth:`_Walk.advance`), in ``x_next``'s memory when ``inplace``."""
    t = x_next.sub_(u) if inplace else torch.sub(x_next, u)
    if m is not None:
        t.add_(m)
    if a != 0:
        t.sub_(x_k, alpha=a)
    if beta != 1:
        t.div_(beta)
    return t


# NOTE [ Reconstruction error ]
# Unit 0's backward could rebuild x_{-1}, a second reconstruction of the stage input x_0:
# max|x_{-1} - x_0| / max|x_0| says whether the coupling inverted in this precision (exactly 0
# in exact mode unless a recompute differed from its forward). It is what the mismatch check
# reads, so it is measured on checked passes only (the first 10 backward passes, then every
# 50th), on the check's sample of about 4096 elements: a few small kernels, instead of passes
# over two states at every step (1.2 ms of a 31 ms ResNet-50 step on an H100 host). Under
# revify.check (``record_input``) it is measured on every element, against the true input.


class _Probe:
    """What unit 0's backward keeps of ``x_1`` and ``x_0`` to measure the reconstruction error
    (NOTE [ Reconstruction error ]): a sample of each, or both whole when the stage recorded its
    true input (revify.check)."""

    def __init__(self, walk: _Walk, x_1: Tensor, x_0: Tensor) -> None:
        self.walk = walk
        self.full = walk.reference is not None
        self.x_1, self.x_0 = (x_1, x_0) if self.full else (_sample(x_1), _sample(x_0))

    def record(self, u: Tensor, m: Tensor | None, a: float) -> None:
        """``last_reconstruction_error`` from the recomputed ``u`` (and ``m``)."""
        walk = self.walk
        pick = (lambda t: t) if self.full else _sample
        x_1, x_0, u = self.x_1, self.x_0, pick(u.detach())
        m = None if m is None else pick(m)
        ref = x_0 if walk.reference is None else walk.reference.to(x_0.dtype)
        if walk.exact:
            x_m1 = _fused.prev_state(
                walk.grid, walk.d, *_exact.coefficients(a, walk.beta, walk.d), u, m, x_0, x_1,
                None,
            )
        else:
            x_m1 = _rebuild(x_1, u, x_0, a, m, walk.beta, inplace=False)
        err = _exact.max_abs(x_m1.sub_(ref))
        if ref is not x_0:
            err = torch.maximum(err, _exact.max_abs(x_0 - ref))
        scale = _exact.max_abs(ref).clamp_min(torch.finfo(ref.dtype).tiny)
        walk.stage.last_reconstruction_error = err / scale


def _sample(x: Tensor) -> Tensor:
    """The mismatch check's sample of ``x`` (NOTE [ Mismatch check ]), as a small tensor."""
    return sampled(x.detach()).clone()


def _judge(walk: _Walk) -> None:
    """Unit 0 of a checked pass: report a recompute that differed from its forward, naming the
    first unit (in backward order) whose rebuilt state deviates (NOTE [ Mismatch check ])."""
    check, stage = walk.check, walk.stage
    walk.check = None
    err = stage.last_reconstruction_error
    bad = check.worst(None if err is None else {-1: err})
    if not bad:
        return
    j = max(bad)  # x_j was rebuilt by unit j + 1; x_{-1} by unit 0
    unit = stage.units[j + 1]
    what = f"stage {stage.name}, unit {unit.name}"
    if walk.exact or (walk.alpha == 0 and walk.beta == 1):
        report_mismatch(stage, what, bad[j], check.tolerance)
    else:  # the error may be rounding, grown by the inverse (DESIGN.md §3)
        report_mismatch(stage, what, bad[j], check.tolerance, cause=(
            f"the coupling alpha={walk.alpha:g}, beta={walk.beta:g} is not invertible in this "
            "precision over the stage (convert with exact=True, or alpha=0, beta=1), or "
            + MISMATCH_CAUSES
        ))
