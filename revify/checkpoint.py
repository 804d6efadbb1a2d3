"""Activation checkpointing of the layers between reversible stages (stem, downsampling).

These layers change shape, so they cannot be inverted; instead they keep only their inputs and
recompute their activations in backward (``_CheckpointFunction.backward``). Unlike
``torch.utils.checkpoint`` the recompute leaves BatchNorm running statistics alone, and the
parameters are inputs of the autograd function, so ``torch.autograd.grad(loss, params)`` works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _mode
from ._replay import _ForwardState, batchnorms, frozen_running_stats

__all__ = ["Segment"]


class Segment:
    """Layers between reversible stages, as generated code run on the converted model.

    Args:
        name: label for reports, e.g. ``"stem"`` or ``"layer1 -> layer2"``.
        code: callable ``code(root, *inputs)`` returning one tensor or a tuple.
        root: the module the code runs on (``self`` in the generated code).
        modules: the submodules the code calls (their BatchNorms are protected on recompute).
        tensors: parameters and buffers the code reads.
        checkpoint: store only the inputs and recompute in backward.
        calls: paths of the submodules called, in order (for reports).
    """

    def __init__(
        self,
        name: str,
        code: Any,
        root: nn.Module,
        modules: Sequence[nn.Module],
        tensors: Sequence[Tensor],
        checkpoint: bool,
        calls: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.code = code
        self.root = root
        self.modules = list(modules)
        self.tensors = list(tensors)
        self.checkpoint = checkpoint
        self.calls = list(calls)

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        tensors = [t for t in self.tensors if t.requires_grad]
        needs_grad = torch.is_grad_enabled() and (
            bool(tensors) or any(isinstance(a, Tensor) and a.requires_grad for a in inputs)
        )
        if not self.checkpoint or not needs_grad or _mode.is_plain():
            out = self.code(self.root, *inputs)
            return out if isinstance(out, tuple) else (out,)
        return _CheckpointFunction.apply(self, len(inputs), *inputs, *tensors)

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, checkpoint={self.checkpoint})"


class _CheckpointFunction(torch.autograd.Function):
    """Runs a :class:`Segment` without storing activations; recomputes them in backward."""

    @staticmethod
    def forward(ctx: Any, seg: Segment, n_in: int, *args: Any) -> tuple[Tensor, ...]:
        inputs = args[:n_in]
        device = next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
        ctx.state = _ForwardState(device)
        ctx.seg, ctx.n_in = seg, n_in
        out = seg.code(seg.root, *inputs)
        outs = out if isinstance(out, tuple) else (out,)
        # An output that is a buffer itself must not become a node of this graph: give an alias.
        own = {id(t) for t in seg.tensors if not t.requires_grad}
        outs = tuple(o.detach() if id(o) in own else o for o in outs)
        ctx.tensor_idx = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.others = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_idx))
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return outs

    @staticmethod
    def backward(ctx: Any, *grad_outs: Tensor | None) -> tuple[Tensor | None, ...]:
        seg: Segment = ctx.seg
        inputs = list(ctx.others)
        needs = ctx.needs_input_grad[2:]
        for i, t in zip(ctx.tensor_idx, ctx.saved_tensors, strict=True):
            inputs[i] = t.detach().requires_grad_(needs[i])
        tensors = [t for t in seg.tensors if t.requires_grad]
        if ctx.n_in + len(tensors) != len(needs):
            raise RuntimeError(
                f"revify: segment {seg.name}: the set of tensors requiring grad changed between "
                "forward and backward (requires_grad toggled mid-step?); recompute the forward"
            )
        with (
            torch.profiler.record_function(f"revify.segment_backward: {seg.name}"),
            torch.enable_grad(),
            ctx.state.replay(),
            frozen_running_stats(batchnorms(seg.modules)),
        ):
            out = seg.code(seg.root, *inputs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g)
            for o, g in zip(outs, grad_outs, strict=True)
            if g is not None and isinstance(o, Tensor) and o.requires_grad
        ]
        wanted_in = [i for i in ctx.tensor_idx if needs[i]]
        wanted_t = [j for j, _ in enumerate(tensors) if needs[ctx.n_in + j]]
        wanted = [inputs[i] for i in wanted_in] + [tensors[j] for j in wanted_t]
        grads: Sequence[Tensor | None] = [None] * len(wanted)
        if pairs and wanted:
            grads = torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
        del out, outs, pairs
        result: list[Tensor | None] = [None] * (ctx.n_in + len(tensors))
        for pos, g in zip(wanted_in + [ctx.n_in + j for j in wanted_t], grads, strict=True):
            result[pos] = g
        return (None, None, *result)
