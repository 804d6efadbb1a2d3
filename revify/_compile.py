"""Regional compilation: each unit of a converted model's reversible stages compiled on its own
by ``torch.compile``, its forward and its recompute in backward one graph (``compile_units``)."""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._replay import (
    _BN_STATS,
    UncachedCasts,
    Written,
    _stand_back,
    _stand_in,
    read_slots,
    slots_of,
)

__all__ = ["compile_units"]

# NOTE [ Regional compile ]
# A reversible stage rebuilds x_{k-1} from x_{k+1} and the recomputed u_k, dividing by the
# coupling's small coefficient, so the recompute must give bitwise the forward's u_k (NOTE
# [ Compiled units ] in _replay.py: a module compiled by the user runs a no-grad graph in
# forward and a training graph in backward, 30 % gradient error on ResNet-18). compile_units
# makes both calls run one compiled graph on the same inputs:
# - Each unit compiles a code object of its own, so it has its own dynamo cache. One code for
#   all units recompiled at every unit (timm's DropPath rate differs from block to block, a
#   guard each) and hit dynamo's recompile limit at ResNet-50's ninth unit, which then ran
#   eagerly; identical units still share inductor's compiled kernels through its FX graph cache.
# - One graph per unit, no graph break: the compiled function calls ``unit.plain`` (its module,
#   or a graph unit's generated code, made before the first trace), not ``unit.raw`` with its
#   direct-call checks (NOTE [ Direct calls ] in _direct.py), which step aside under dynamo. A
#   break inside a unit resumes in a frame that every unit shares, whose cache then fills up.
#   A break the model itself makes (a full backward hook on a module inside a unit,
#   torch._dynamo.graph_break) is still correct: past the recompile limit dynamo runs such a
#   frame's cached graphs only and other calls eagerly, the same in forward and recompute
#   (probed: 12 ResNet-50 units, a break in each, two shapes, float64 7e-13), but slower.
# - Every graph runs with autocast's cast cache off, as the eager units' forward does (NOTE
#   [ Uncached casts ] in _replay.py): the cache's state is one of dynamo's guards.
# - The forward runs with grad, on a detached ``h`` requiring grad exactly when the backward's
#   ``h`` will (the training graph), and drops the graph at once: one unit's saved tensors are
#   alive for the length of the call, and saved-tensor hooks see them.
# - Parameters: the recompute reads stand-ins when they have tensor hooks (NOTE [ Recompute
#   leaves ]), plain tensors in a Parameter's slot, which dynamo guards on; the forward then
#   reads the same kind of stand-in. The recompute asks for every parameter's gradient (a
#   subset, as torch.autograd.grad(loss, some) asks, would be another graph) and keeps those
#   wanted.
# - BatchNorm: the running-statistics update is part of the graph (switching it off, as the
#   eager recompute does, is another graph), so the recompute runs on copies of the statistics
#   (written buffers of its Recompute, NOTE [ Buffers a forward writes ] in _replay.py),
#   and an exact stage's redone forward first puts back the statistics it found.
# - The RNG state is replayed as for eager units; inductor draws its seeds from torch's
#   generator, so dropout and DropPath draw the forward's numbers.
# - Checked: a recompute that compiles a new graph, or runs another kind of graph than the
#   forward (eager once the recompile limit is hit, where the forward ran compiled), raises
#   naming the unit. A forward that finds the cache full runs eagerly, and so does its
#   recompute, which is consistent. Not caught: a recompute that finds another graph already
#   cached (an attribute the code reads set back and forth, each value compiled before), which
#   only the stage's mismatch check (NOTE [ Mismatch check ] in _replay.py) can see.
# Units run eagerly where their recompute is not theirs to control: stages with the
# "checkpoint" treatment (their steps are Segments), and in revify.check (its float64 truth is
# an eager copy: compiled code draws other dropout numbers). FSDP2's driven units are refused.
# Measured (CPU, inductor, DropPath 0.3, batch 4, 32 px, fp32): gradients within 2e-8 of
# ordinary autograd of the same compiled units on resnet18, 4.7e-6 on resnet50 (the slow
# test bounds it at 1e-5), no new graph at the second step; resnet50's 12 graphs compile in
# 27 s at 64 px.


def _call(unit: Any, h: Tensor, side: tuple) -> Tensor:
    return unit.plain(h, *side)


def _fresh(index: int) -> types.FunctionType:
    """A copy of :func:`_call` with a code object of its own (its own dynamo cache)."""
    code = _call.__code__.replace(co_name=f"_revify_unit_{index}")
    return types.FunctionType(code, _call.__globals__, code.co_name)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _kind(u: Tensor) -> str | None:
    return None if u.grad_fn is None else type(u.grad_fn).__name__


def _describe(kind: str | None) -> str:
    if kind is None:
        return "without grad"
    return "a compiled graph" if kind.startswith("CompiledFunction") else f"eager code ({kind})"


def stat_slots(bns: Sequence[_BatchNorm]) -> list[tuple[dict[str, Any], str]]:
    """The running-statistics slots of the train-mode BatchNorms in ``bns`` that update them."""
    return [
        (bn._buffers, k) for bn in bns if bn.training and bn.track_running_stats
        for k, t in bn._buffers.items() if t is not None and k in _BN_STATS
    ]


def scratch_stats(bns: Sequence[_BatchNorm]) -> list[Written]:
    """``bns``' running statistics as written buffers read as they are now: a recompute run in
    a :class:`Recompute` given them updates copies (the graph's update lands there)."""
    return [Written(slot, None) for slot in stat_slots(bns)]


class CompiledUnit:
    """One unit's ``raw`` compiled by ``torch.compile`` (NOTE [ Regional compile ])."""

    __slots__ = ("index", "options", "fn", "kind", "ready")

    def __init__(self, index: int, options: dict[str, Any]) -> None:
        self.index, self.options = index, options
        self.fn = torch.compile(_fresh(index), **options)
        self.kind: str | None = None  # the kind of graph the last training forward ran
        self.ready = False  # the unit's generated code made (_ready)

    def __reduce__(self) -> tuple[Any, ...]:
        # a copy (deepcopy for an EMA model, pickle) compiles afresh, with a cache of its own
        return CompiledUnit, (self.index, self.options)

    def _ready(self, unit: Any) -> None:
        # a graph unit's code is generated at its first call, which dynamo cannot trace
        code = getattr(unit, "code", None)
        if hasattr(code, "ready"):
            code.ready()
        self.ready = True

    def _run(self, unit: Any, h: Tensor, side: tuple) -> Tensor:
        inside = getattr(unit, "inside", None)  # a layer of a stack: its context, set here
        if inside is None:
            return self.fn(unit, h, side)
        with inside():
            return self.fn(unit, h, side)

    def __call__(self, unit: Any, h: Tensor, side: tuple) -> Tensor:
        """A call no recompute repeats (no grad, or ordinary autograd)."""
        if not self.ready:
            self._ready(unit)
        return self._run(unit, h, side)

    def forward(self, unit: Any, h: Tensor, side: tuple, dx: bool) -> Tensor:
        """Unit ``unit``'s output in a step's forward: the graph its recompute will run."""
        if not self.ready:
            self._ready(unit)
        slots = slots_of(unit)
        tensors = read_slots(slots.slots, grad_only=True)
        stand = _stand_in(unit.name, slots.slots, tensors, [True] * len(tensors), False)[1]
        try:
            with torch.enable_grad(), UncachedCasts():
                u = self._run(unit, h.detach().requires_grad_(dx), side)
        finally:
            _stand_back(unit.name, slots.slots, stand, False)
        self.kind = _kind(u)
        return u.detach()

    def recompute(self, what: str, unit: Any, h: Tensor, side: tuple, kind: str | None
                  ) -> Tensor:
        """The recompute of a forward that ran ``kind`` of graph, in a :class:`Recompute`
        context entered with every parameter wanted, no BatchNorm frozen and its statistics
        on copies (:func:`scratch_stats`)."""
        before = _graphs()
        with UncachedCasts():
            u = self._run(unit, h, side)
        new = _graphs() - before
        if new or _kind(u) != kind:
            ran = (f"compiled {new} new graph(s)" if new else
                   f"ran {_describe(_kind(u))} where its forward ran {_describe(kind)}")
            raise RuntimeError(
                f"revify: {what}: its compiled recompute {ran}, so it would not compute what "
                "its forward computed and the gradients would be wrong (NOTE [ Regional "
                "compile ] in revify/_compile.py). Something the compiled code reads changed "
                "between the forward and the backward (a module attribute, requires_grad, a "
                "tensor hook); run such steps without revify.compile_units"
            )
        return u


def compile_units(model: nn.Module, **options: Any) -> nn.Module:
    """Compile each unit of ``model``'s reversible stages with ``torch.compile(**options)``
    (default ``dynamic=False``), each on its own; returns ``model``.

    Regional compilation: every unit's forward and its recompute in backward run one compiled
    graph, bitwise alike, with the forward's random numbers (NOTE [ Regional compile ] in
    ``revify/_compile.py``); a recompute that would run another graph raises, naming the unit.
    The checkpointed segments (stem, transitions) and the layers outside the trunk stay eager;
    ``torch.compile(model)`` on top compiles the latter too. Call it after ``revify.convert``
    (``revert`` drops it); copies of the model (``copy.deepcopy``, pickling) compile their own.
    Units driven by FSDP2's ``fully_shard`` are refused at their forward.
    """
    from .convert import stages

    found = stages(model)
    if not found:
        raise ValueError(
            f"revify.compile_units: {type(model).__name__} has no reversible stage; call "
            "revify.convert(model) first"
        )
    options = {"dynamic": False, **options}
    index = 0
    for stage in found:
        for unit in stage.units:
            unit.compiled = CompiledUnit(index, options)
            index += 1
    return model


@contextmanager
def eager_units(model: nn.Module) -> Iterator[None]:
    """While entered, the units :func:`compile_units` compiled run eagerly (revify.check: a
    compiled float64 copy draws other dropout numbers than the compiled model)."""
    from .convert import stages

    units = [u for st in stages(model) for u in compiled_units(st.units)]
    kept = [u.compiled for u in units]
    for u in units:
        u.compiled = None
    try:
        yield
    finally:
        for u, c in zip(units, kept, strict=True):
            u.compiled = c


def compiled_units(units: Sequence[Any]) -> Iterator[Any]:
    """The units of ``units`` that :func:`compile_units` compiled."""
    return (u for u in units if getattr(u, "compiled", None) is not None)
