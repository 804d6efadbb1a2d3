"""Activation checkpointing of the layers between reversible stages (stem, downsampling).

These layers change shape, so they cannot be inverted; instead they keep only their inputs and
recompute their activations in backward (``_CheckpointFunction.backward``). Unlike
``torch.utils.checkpoint`` the recompute leaves BatchNorm running statistics alone, and the
parameters are inputs of the autograd function, so ``torch.autograd.grad(loss, params)`` works.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from itertools import compress
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from . import _fsdp, _mode
from ._replay import (
    TRAINING,
    VERSION,
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
    read_slots,
    refuse_compiled,
    report_mismatch,
    slots_of,
    vjp,
    warn_hooked,
)

__all__ = ["Segment"]

_REQUIRES_GRAD = operator.attrgetter("requires_grad")


class Segment(MismatchOptions):
    """Layers between reversible stages, as generated code run on the converted model.

    Args:
        name: label for reports, e.g. ``"stem"`` or ``"layer1 -> layer2"``.
        code: callable ``code(root, *inputs)`` returning one tensor or a tuple.
        root: the module the code runs on (``self`` in the generated code).
        modules: the submodules the code calls (their BatchNorms are protected on recompute).
        reads: where the code reads its parameters and buffers (``reads.owners()``, a
            ``coupling._Reads``).
        checkpoint: store only the inputs and recompute in backward.
        calls: paths of the submodules called, in order (for reports).
        pieces: the same computation split at single-tensor cuts (the stem, then a first block):
            ``pieces[0]`` takes the inputs, each next piece the one tensor the previous returns,
            the last returns what ``code`` does. The backward recomputes one piece at a time.

    Attributes:
        on_mismatch, mismatch_tolerance: as for :class:`ReversibleStage`: the backward compares
            a sample of the recomputed outputs with the forward's (NOTE [ Mismatch check ]).
    """

    def __init__(
        self,
        name: str,
        code: Any,
        root: nn.Module,
        modules: Sequence[nn.Module],
        reads: Any,
        checkpoint: bool,
        calls: Sequence[str] = (),
        pieces: Sequence[Any] | None = None,
    ) -> None:
        self.name = name
        self.code = code
        self.root = root
        self.modules = list(modules)
        self._reads = reads
        self.checkpoint = checkpoint
        self.checkpointable = checkpoint  # whether the planner may checkpoint it (_plan.py)
        self.calls = list(calls)
        self.pieces = list(pieces) if pieces else [code]
        # Per piece, the positions of the buffers its forward was seen to write (NOTE [ Buffers
        # a forward writes ] in _replay.py); None before its first recorded call.
        self.written: list[frozenset[int] | None] = [None] * len(self.pieces)

    def tensors(self) -> list[Tensor]:
        """The parameters and buffers the code reads now (NOTE [ Slot cache ])."""
        return read_slots(slots_of(self).slots)

    def owners(self) -> Owners:
        """Where the code reads its tensors (``_replay.stand_ins``, ``_replay.state_slots``)."""
        return self._reads.owners()

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        reads = self.tensors()
        grad = list(map(_REQUIRES_GRAD, reads))
        tensors = list(compress(reads, grad))
        needs_grad = torch.is_grad_enabled() and (
            bool(tensors) or any(isinstance(a, Tensor) and a.requires_grad for a in inputs)
        )
        if not self.checkpoint or not needs_grad or _mode.is_plain():
            return _tuple(self.code(self.root, *inputs))
        slots = slots_of(self)
        found = forward_hooked(slots.modules)
        if found is not None:  # NOTE [ Forward hooks inside stages ] in _replay.py
            warn_hooked(f"segment {self.name}", found, [("", self.root)],
                        self.__dict__.setdefault("_hook_warned", set()))
            with _mode.plain_autograd():
                return _tuple(self.code(self.root, *inputs))
        refuse_compiled(f"segment {self.name}", slots)  # NOTE [ Compiled units ]
        states = (_fsdp.driven(_fsdp.states_of(self, slots.slots), f"segment {self.name}")
                  if _fsdp.active() else [])
        if not states:
            buffers = frozenset(map(id, compress(reads, map(operator.not_, grad))))
            return _CheckpointFunction.apply(self, buffers, len(inputs), *inputs, *tensors)
        # NOTE [ FSDP2 ] in _fsdp.py: the Function's inputs are the unsharded parameters
        _fsdp.unshard(states)
        try:
            reads = self.tensors()
            tensors = [t for t in reads if t.requires_grad]
            buffers = frozenset(id(t) for t in reads if not t.requires_grad)
            inputs = _fsdp.post_backward_on(states, inputs)
            self._fsdp_driven = states
            with _fsdp.hooks_pass_through(states):
                return _CheckpointFunction.apply(self, buffers, len(inputs), *inputs, *tensors)
        finally:
            self._fsdp_driven = []
            _fsdp.reshard(states)

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, checkpoint={self.checkpoint})"


def _tuple(out: Any) -> tuple[Any, ...]:
    return out if isinstance(out, tuple) else (out,)


class _CheckpointFunction(torch.autograd.Function):
    """Runs a :class:`Segment` without storing activations; recomputes them in backward."""

    @staticmethod
    def forward(
        ctx: Any, seg: Segment, buffers: frozenset[int], n_in: int, *args: Any
    ) -> tuple[Tensor, ...]:
        inputs = args[:n_in]
        device = next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
        ctx.seg, ctx.n_in = seg, n_in
        ctx.fsdp = seg.__dict__.get("_fsdp_driven", [])  # NOTE [ FSDP2 ] in _fsdp.py
        ctx.tensor_ids = list(map(id, args[n_in:]))
        ctx.modes = list(map(TRAINING, slots_of(seg).modules))
        # FSDP2 writes the unsharded parameters again for the backward (NOTE [ FSDP2 ])
        ctx.tensor_versions = None if ctx.fsdp else list(map(VERSION, args[n_in:]))
        # Each piece's RNG/autocast state, so that the backward can recompute any one alone.
        ctx.states, ctx.written = [], []
        slots = slots_of(seg).state
        outs: tuple[Any, ...] = inputs
        with UncachedCasts():  # NOTE [ Uncached casts ] in _replay.py
            for p, piece in enumerate(seg.pieces):
                ctx.states.append(_ForwardState(device))
                watch = BufferWatch(slots, seg.written[p])
                outs = _tuple(piece(seg.root, *outs))
                written, seg.written[p] = watch.written()
                ctx.written.append(written)
        # An output that is a buffer itself must not become a node of this graph: give an alias.
        outs = tuple(o.detach() if id(o) in buffers else o for o in outs)
        floats = [i for i, o in enumerate(outs) if isinstance(o, Tensor) and o.is_floating_point()]
        ctx.check = RecomputeCheck.due(seg, outs[floats[0]]) if floats else None
        for i in floats if ctx.check is not None else ():
            ctx.check.record(i, outs[i])
        ctx.tensor_idx = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.others = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_idx))
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return outs

    @staticmethod
    def backward(ctx: Any, *grad_outs: Tensor | None) -> tuple[Tensor | None, ...]:
        # create_graph=True: the gradient must be a graph too
        body = _segment_backward_graph if torch.is_grad_enabled() else _segment_backward
        if torch._C._autograd._profiler_enabled():  # a label, only where a profiler runs
            with torch.profiler.record_function(f"revify.segment_backward: {ctx.seg.name}"):
                return body(ctx, *grad_outs)
        return body(ctx, *grad_outs)


def _segment_backward(ctx: Any, *grad_outs: Tensor | None) -> tuple[Tensor | None, ...]:
    """The body of :meth:`_CheckpointFunction.backward`.

    With one piece: recompute, then one vjp. With several, the pieces before the last are first
    run without grad to rebuild their outputs, then each piece, last first, is recomputed with
    grad and backpropagated on its own, so only one piece's activations exist at a time (the
    earlier pieces run twice)."""
    seg: Segment = ctx.seg
    inputs = list(ctx.others)
    needs = ctx.needs_input_grad[3:]
    for i, t in zip(ctx.tensor_idx, ctx.saved_tensors, strict=True):
        inputs[i] = t.detach().requires_grad_(needs[i])
    _fsdp.pre_backward(ctx.fsdp)
    slots = slots_of(seg)
    tensors = read_slots(slots.slots, grad_only=True)
    what = f"segment {seg.name}"
    check_same_tensors(what, ctx.tensor_ids, tensors, ctx.tensor_versions)
    check_modes(what, ctx.modes, slots)
    bns = slots.bns
    # boundary[p]: the inputs of piece p.
    boundary: list[tuple[Any, ...]] = [tuple(inputs)]
    for p, (piece, state) in enumerate(zip(seg.pieces[:-1], ctx.states, strict=False)):
        with Recompute(what, state, bns, ctx.written[p], grad=False):
            boundary.append(_tuple(piece(seg.root, *boundary[-1])))
    needs_t = needs[ctx.n_in:]
    wanted_t = list(compress(range(len(tensors)), needs_t))
    grads_t: list[Tensor | None] = [None] * len(wanted_t)
    wanted_in = [i for i in ctx.tensor_idx if needs[i]]
    grads_in: Sequence[Tensor | None] = [None] * len(wanted_in)
    g_outs: Sequence[Tensor | None] = grad_outs
    for p in reversed(range(len(seg.pieces))):
        first = p == 0
        ins = boundary.pop()
        if not first:  # the piece's input: a detached leaf whose gradient goes to piece p-1
            ins = tuple(t.detach().requires_grad_(True) for t in ins)
        with Recompute(what, ctx.states[p], bns, ctx.written[p], slots.slots, tensors,
                       needs_t) as leaves:
            outs = _tuple(seg.pieces[p](seg.root, *ins))
        if ctx.check is not None:  # the last piece, recomputed first: NOTE [ Mismatch check ]
            _judge(ctx, outs)
        # Gradient edges, not the outputs themselves: an output is freed as soon as the vjp is
        # past the op that made it.
        pairs = [
            (get_gradient_edge(o) if o.grad_fn is not None else o, g)
            for o, g in zip(outs, g_outs, strict=True)
            if g is not None and isinstance(o, Tensor) and o.requires_grad
        ]
        del outs
        wrt = [ins[i] for i in wanted_in] if first else list(ins)
        wanted = wrt + list(compress(leaves, needs_t))
        del leaves
        grads: Sequence[Tensor | None] = [None] * len(wanted)
        if pairs and wanted:
            grads = vjp([o for o, _ in pairs], wanted, [g for _, g in pairs])
        del pairs, ins
        if p == len(seg.pieces) - 1:  # the first piece backpropagated: nothing to add to
            grads_t = list(grads[len(wrt):])
        else:
            for j, g in enumerate(grads[len(wrt):]):
                if g is not None:
                    grads_t[j] = g if grads_t[j] is None else grads_t[j] + g
        if first:
            grads_in = grads[: len(wrt)]
        else:
            g_outs = grads[: len(wrt)]
        del grads
    result_in: list[Tensor | None] = [None] * ctx.n_in
    for i, g in zip(wanted_in, grads_in, strict=True):
        result_in[i] = g
    if len(wanted_t) == len(tensors):  # every tensor needs its gradient
        return (None, None, None, *result_in, *grads_t)
    result_t: list[Tensor | None] = [None] * len(tensors)
    for j, g in zip(wanted_t, grads_t, strict=True):
        result_t[j] = g
    return (None, None, None, *result_in, *result_t)


def _segment_backward_graph(ctx: Any, *grad_outs: Tensor | None) -> tuple[Tensor | None, ...]:
    """The backward under ``create_graph=True`` (gradient penalties): the gradients are
    differentiable functions of the segment's inputs, parameters and output gradients.

    The pieces are recomputed together with grad from views of the saved inputs and of the
    parameters (NOTE [ Recompute leaves ]), and the gradient graph, which holds the
    activations like ordinary autograd's, leads back to them.
    """
    seg: Segment = ctx.seg
    ctx.check = None
    needs = ctx.needs_input_grad[3:]
    inputs = list(ctx.others)
    for i, t in zip(ctx.tensor_idx, ctx.saved_tensors, strict=True):
        inputs[i] = t.view_as(t) if needs[i] else t.detach()
    _fsdp.pre_backward(ctx.fsdp)
    tensors = [t for t in seg.tensors() if t.requires_grad]
    what = f"segment {seg.name}"
    check_same_tensors(what, ctx.tensor_ids, tensors, ctx.tensor_versions)
    check_modes(what, ctx.modes, slots_of(seg))
    needs_t = needs[ctx.n_in:]
    slots = slots_of(seg)
    bns = slots.bns
    with Recompute(what, None, (), (), slots.slots, tensors, needs_t, linked=True,
                   grad=None) as leaves:
        outs: tuple[Any, ...] = tuple(inputs)
        for p, piece in enumerate(seg.pieces):
            with Recompute(what, ctx.states[p], bns, ctx.written[p], grad=None):
                outs = _tuple(piece(seg.root, *outs))
    pairs = [
        (o, g) for o, g in zip(outs, grad_outs, strict=True)
        if g is not None and isinstance(o, Tensor) and o.requires_grad
    ]
    positions = [i for i in ctx.tensor_idx if needs[i]]
    wanted = [inputs[i] for i in positions]
    positions += [ctx.n_in + j for j, need in enumerate(needs_t) if need]
    wanted += [t for t, need in zip(leaves, needs_t, strict=True) if need]
    result: list[Tensor | None] = [None] * (ctx.n_in + len(tensors))
    if pairs and wanted:
        grads = torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
            create_graph=True,
        )
        for pos, g in zip(positions, grads, strict=True):
            result[pos] = g
    return (None, None, None, *result)


def _judge(ctx: Any, outs: tuple[Any, ...]) -> None:
    """Report recomputed outputs that differ from the forward's (NOTE [ Mismatch check ])."""
    check, ctx.check = ctx.check, None
    for i, o in enumerate(outs):
        if isinstance(o, Tensor):
            check.compare(i, o)
    bad = check.worst()
    if bad:
        seg = ctx.seg
        report_mismatch(seg, f"segment {seg.name}", max(bad.values()), check.tolerance)
