"""Peak memory of a training step, from deterministic allocation counts (``torch.profiler``).

A stack of full-resolution residual blocks with few parameters, so that activations dominate
the peak: per-block checkpointing keeps one block input per block, revify's stage keeps two
states whatever its depth, and its backward works on one unit at a time.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import counting
from torch import nn
from torch.utils.checkpoint import checkpoint

import revify
from revify import _costs
from revify.check import _peak_live_bytes
from revify.convert import plans

_BATCH, _WIDTH, _SIDE = 4, 32, 48
# One full-size fp32 activation of the stack: batch x width x side x side.
_STATE = _BATCH * _WIDTH * _SIDE * _SIDE * 4


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _Stack(nn.Module):
    def __init__(self, depth: int, checkpoint_blocks: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, _WIDTH, 3, padding=1), nn.BatchNorm2d(_WIDTH))
        self.blocks = nn.Sequential(*(_Block(_WIDTH) for _ in range(depth)))
        self.head = nn.Linear(_WIDTH, 10)
        self.checkpoint_blocks = checkpoint_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks else block(x)
        return self.head(x.mean((2, 3)))


def _step_peak(model: nn.Module) -> int:
    """Peak live bytes of one step, gradients already allocated (as from step 2 of training)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_BATCH, 3, _SIDE, _SIDE, generator=gen)
    target = torch.randint(0, 10, (_BATCH,), generator=gen)

    def step() -> None:
        F.cross_entropy(model(x), target).backward()

    step()
    return _peak_live_bytes(step)


def _revify(depth: int, **options) -> nn.Module:
    torch.manual_seed(0)
    model = _Stack(depth)
    revify.convert(model, torch.zeros(2, 3, _SIDE, _SIDE), **options)
    (stage,) = revify.stages(model)
    assert len(stage.units) == depth
    return model


@pytest.fixture(scope="module")
def peaks() -> dict[str, int]:
    torch.manual_seed(0)
    revnet = dict(coupling="revnet")
    return {
        "revnet-4": _step_peak(_revify(4, **revnet)),
        "revnet-16": _step_peak(_revify(16, **revnet)),
        "revify-4": _step_peak(_revify(4)),
        "revify-16": _step_peak(_revify(16)),
        "ckpt-16": _step_peak(_Stack(16, checkpoint_blocks=True)),
    }


def test_peak_does_not_grow_with_depth(peaks):
    # RevNet coupling: twelve more units add no state and no stage-wide gradient copy, only
    # their parameter gradients' transients (a few KB each).
    assert peaks["revnet-16"] <= peaks["revnet-4"] + _STATE // 4
    # The default (faithful) coupling stores the 6-bit remainder of each unit after the first:
    # twelve more units add twelve of them, 0.75 byte per element, and nothing else.
    remainders = 12 * _STATE * 6 // (8 * 4)
    assert peaks["revify-16"] <= peaks["revify-4"] + remainders + _STATE // 4
    assert peaks["revify-16"] >= peaks["revify-4"] + remainders  # they are stored, and counted


def test_peak_below_per_block_checkpointing(peaks):
    # Per-block checkpointing holds 16 block inputs; revify holds two states and two adjoints,
    # and the default (faithful) coupling 15 remainders of 6 bits besides (2.8 states here).
    assert peaks["revnet-16"] <= 0.5 * peaks["ckpt-16"]
    remainders = 15 * _STATE * 6 // (8 * 4)
    assert peaks["revify-16"] <= peaks["revnet-16"] + remainders + _STATE // 4
    assert peaks["revify-16"] <= 0.6 * peaks["ckpt-16"]


def test_unit_gradients_are_handed_on_before_earlier_units_recompute():
    """Each unit is its own autograd node: the last unit's parameter gradients are accumulated
    (DDP's hooks can fire) before the first unit is recomputed, not at the end of the stage."""
    model = _revify(3)
    events: list[str] = []
    model.blocks[2].conv1.weight.register_post_accumulate_grad_hook(
        lambda p: events.append("grad of unit 2")
    )
    model.blocks[0].register_forward_hook(counting(
        lambda *_: events.append("unit 0 runs") if torch.is_grad_enabled() else None
    ))
    model(torch.randn(2, 3, _SIDE, _SIDE)).sum().backward()
    # Forward (the stage's units run without grad), then the backward's recompute of unit 0.
    assert events == ["grad of unit 2", "unit 0 runs"]


def test_segment_pieces_are_chosen_by_simulated_peak(monkeypatch) -> None:
    """RegNet's one-block stages are leaf calls from the root: cutting the stem segment between
    them lowers its backward peak, so conversion keeps those pieces (NOTE [ Segment pieces ]),
    and the default plan then stays below timm checkpointing's peak."""
    model = timm.create_model("regnetx_002")
    spd = _costs.speed("cpu")

    def peak(m) -> int:
        return _costs.measure(m, (4, 3, 96, 96), torch.float32, torch.device("cpu"), spd).peak

    chosen = revify.convert(copy.deepcopy(model), torch.zeros(2, 3, 96, 96))
    stem = plans(chosen)[0][1].segments[0]
    assert stem.calls[:3] == ["stem", "s1", "s2"] and len(stem.pieces) == 4
    monkeypatch.setattr(sys.modules["revify._plan"], "_segment_peak", lambda *args: None)
    coarse = revify.convert(copy.deepcopy(model), torch.zeros(2, 3, 96, 96))
    assert len(plans(coarse)[0][1].segments[0].pieces) < 4
    timm_ckpt = copy.deepcopy(model)
    timm_ckpt.set_grad_checkpointing(True)
    assert peak(chosen) < peak(coarse) and peak(chosen) < peak(timm_ckpt)


def test_saved_state_is_reused_by_the_backward_unless_the_graph_is_kept(monkeypatch):
    """NOTE [ Saved states ]: under bf16 autocast step n-2 rebuilds x_{n-3} into the saved
    x_{n-1}'s memory, so the walk holds two fp32 states through its vjp, not three; where the
    graph is kept (torch cannot say otherwise here) a fresh state is made, a state's more."""
    model = _revify(5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_BATCH, 3, _SIDE, _SIDE, generator=gen)
    target = torch.randint(0, 10, (_BATCH,), generator=gen)

    def backward_peak() -> int:  # the backward's, above what the forward left alive
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target)
        del logits
        return _peak_live_bytes(loss.backward)

    backward_peak()
    reused = backward_peak()
    monkeypatch.setattr(sys.modules["revify.coupling"], "_keeps_graph", lambda: True)
    fresh = backward_peak()
    assert fresh - reused >= 0.9 * _STATE


def test_stage_forward_keeps_no_autocast_weight_copies(monkeypatch):
    """NOTE [ Uncached casts ]: under bf16 autocast a stage's forward frees each unit's bf16
    weight copy after use, instead of leaving every copy in autocast's cache until the outer
    region ends. Wide units on a tiny image, so that the weights dominate the forward's peak."""
    torch.manual_seed(0)
    width, depth = 64, 6
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), *(_Block(width) for _ in range(depth)),
        nn.Flatten(), nn.Linear(width * 4 * 4, 10),
    )
    revify.convert(model, torch.zeros(2, 3, 4, 4))
    assert [len(s.units) for s in revify.stages(model)] == [depth]
    x = torch.randn(2, 3, 4, 4)

    def forward_peak() -> int:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x).float().sum()

        return _peak_live_bytes(run)

    uncached = forward_peak()
    monkeypatch.setattr(sys.modules["revify.coupling"], "UncachedCasts", contextlib.nullcontext)
    cached = forward_peak()
    copies = sum(b.conv1.weight.numel() + b.conv2.weight.numel() for b in model[1:-2]) * 2
    assert cached - uncached >= 0.8 * copies
