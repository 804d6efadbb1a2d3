"""Stage treatments (NOTE [ Stage treatments ] in coupling.py) against ordinary autograd.

Every treatment of a stage ("reversible", "checkpoint", "checkpoint:k", "store") and of a
segment ("checkpoint", "store") evaluates the same function, so a plan of any mix must give the
gradients of ``revify.plain_autograd()`` on the same converted model: float64, BatchNorm in train
mode with re-randomised affine parameters, non-zero residual branches, DropPath/Dropout active,
the same RNG seed before each forward. Each comparison also checks, on the autograd graph, that
every step really ran as its treatment says (a unit's checkpointed Segment, a reversible step
node, or neither), so a treatment silently falling back to another cannot pass.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import timm
import torch
import torchvision
from conftest import CountingBlock, ReluBlock, bn_state, max_rel_err, restore, timm_model
from torch import nn

import revify
import revify._exact
from revify import _costs, planner
from revify.checkpoint import Segment
from revify.convert import plans
from revify.coupling import ReversibleStage

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # a recompute that differed from its forward warns (NOTE [ Mismatch check ]): a failure here
    pytest.mark.filterwarnings("error::RuntimeWarning"),
]

F64 = torch.float64


# Models ----------------------------------------------------------------------------------------


class BNBlock(nn.Module):
    """``x + dropout(tanh(bn(conv(x))))``: a block module whose branch is the residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.tanh(self.bn(self.conv(x))))


class HandNet(nn.Module):
    """Inline residuals (``x = x + self.f(x)``, ``f1`` shared by two units) and block modules
    (a post-add ``relu(h + conv(h))`` block among them) in two stages of 5 and 4 units, a
    BatchNorm stem, a downsampling transition and a tail (the head)."""

    def __init__(self, w: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.f1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                nn.ReLU())
        self.f2 = nn.Conv2d(w, w, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.blocks = nn.Sequential(BNBlock(w), BNBlock(w))
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * w))
        self.blocks2 = nn.Sequential(ReluBlock(2 * w), BNBlock(2 * w), BNBlock(2 * w))
        self.f3 = nn.Sequential(nn.BatchNorm2d(2 * w), nn.Conv2d(2 * w, 2 * w, 1))
        self.head = nn.Linear(2 * w, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.f1(x)
        x = x + self.drop(self.f2(x))
        x = self.blocks(x)
        x = x + self.f1(x)
        x = self.down(x)
        x = self.blocks2(x)
        x = x + self.f3(x)
        return self.head(x.mean((2, 3)))


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Norm weights in 0.5..1.5, biases in -0.2..0.2, ConvNeXt layer scales in 0.2..0.8: no
    branch is (nearly) zero, no normalisation the identity."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
            gamma = getattr(m, "gamma", None)
            if isinstance(gamma, nn.Parameter):
                gamma.copy_(torch.rand(gamma.shape, generator=gen) * 0.6 + 0.2)
    return model


def _hand() -> nn.Module:
    torch.manual_seed(0)
    return HandNet()


def _torchvision_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3)


def _timm(name: str):
    return lambda: timm_model(name, drop_path_rate=0.1, drop_rate=0.2, num_classes=3)


def _convnext() -> nn.Module:
    torch.manual_seed(0)  # ConvNeXt takes no zero_init_last; its layer scales are randomised
    return timm.create_model("convnext_atto", pretrained=False, drop_path_rate=0.1,
                             drop_rate=0.2, num_classes=3)


MODELS = {  # name: (builder, convert options)
    "hand": (_hand, {}),
    "hand-revnet": (_hand, {"coupling": "revnet"}),
    "torchvision-resnet18": (_torchvision_resnet18, {}),
    "timm-resnet18": (_timm("resnet18"), {}),
    "timm-resnet50": (_timm("resnet50"), {}),
    "convnext-faithful": (_convnext, {"coupling": "faithful"}),
    "convnext-revnet": (_convnext, {"coupling": "revnet"}),
}
SIZE = 32


def _input(batch: int = 2, dtype: torch.dtype = F64, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3),
                       dtype=dtype)


def _build(name: str, dtype: torch.dtype = F64, plan=None, size: int = SIZE) -> nn.Module:
    build, options = MODELS[name]
    model = _randomise_norms(build()).to(dtype)
    revify.convert(model, _input(2, dtype, size), plan=plan, **options)
    return model.train()


@pytest.fixture(scope="module")
def zoo():
    """Converted float64 models, built once per module; each test sets every step's treatment
    (``_treat``) before using one, so tests do not depend on each other's plans."""
    built: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in built:
            built[name] = _build(name)
        return built[name]

    return get


# Plans -----------------------------------------------------------------------------------------


def _plan(model: nn.Module):
    ((path, plan),) = plans(model)
    assert path == ""
    return plan


def _defaults(model: nn.Module) -> dict[str, str]:
    """convert's treatments: stages reversible, stem and transitions checkpointed."""
    return {
        step.run.name: "reversible" if isinstance(step.run, ReversibleStage)
        else "checkpoint" if step.run.checkpointable else "store"
        for step in _plan(model).steps
    }


def _treat(model: nn.Module, treatments: dict[str, str]) -> dict[str, str]:
    """Set every step's treatment (the named ones, the rest convert's default) as
    ``convert(plan=...)`` does, and check ``revify.memory_plan`` reports them."""
    full = {**_defaults(model), **treatments}
    planner.apply(_plan(model), full)
    assert revify.memory_plan(model).treatments == full
    return full


def _uniform(model: nn.Module, treatment: str) -> dict[str, str]:
    """Every stage ``treatment``; with "store", the segments stored too."""
    out = {st.name: treatment for st in revify.stages(model)}
    if treatment == "store":
        out.update({s.name: "store" for s in _plan(model).segments})
    return out


def _mixed(model: nn.Module, shift: int) -> dict[str, str]:
    """Stages cycle through partial checkpointing, store, reversible and checkpoint, the
    checkpointable segments through store and checkpoint, starting ``shift`` along."""
    kinds = itertools.islice(itertools.cycle(["half", "store", "reversible", "checkpoint"]),
                             shift, None)
    seg_kinds = itertools.islice(itertools.cycle(["store", "checkpoint"]), shift, None)
    out = {}
    for step in _plan(model).steps:
        run = step.run
        if isinstance(run, ReversibleStage):
            kind = next(kinds)
            out[run.name] = f"checkpoint:{max(1, len(run.units) // 2)}" if kind == "half" \
                else kind
        elif run.checkpointable:
            out[run.name] = next(seg_kinds)
    return out


def _checkpointed_units(stage: ReversibleStage) -> int:
    t = stage.treatment
    if t == "checkpoint":
        return len(stage.units)
    return int(t.partition(":")[2]) if t.startswith("checkpoint:") else 0


def _graph(y: torch.Tensor) -> tuple[set[int], set[tuple[str, int]]]:
    """The checkpointed segments (by id) and the reversible step nodes (stage, unit) of the
    autograd graph of ``y``."""
    segments: set[int] = set()
    steps: set[tuple[str, int]] = set()
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = type(node).__name__
        if kind == "_CheckpointFunctionBackward":
            segments.add(id(node.seg))
        elif kind == "_UnitStepBackward":
            steps.add((node.walk.stage.name, node.k))
        todo.extend(f for f, _ in node.next_functions)
    return segments, steps


def _assert_ran_as_planned(model: nn.Module, y: torch.Tensor) -> None:
    segments, steps = _graph(y)
    for step in _plan(model).steps:
        run = step.run
        if isinstance(run, ReversibleStage):
            k = _checkpointed_units(run)
            for j in range(len(run.units)):
                assert (id(run.unit_segment(j)) in segments) == (j < k), (run, j)
                assert ((run.name, j) in steps) == (run.treatment == "reversible"), (run, j)
        else:
            assert isinstance(run, Segment)
            assert (id(run) in segments) == run.checkpoint, run


# Steps -----------------------------------------------------------------------------------------


def _mode(plain: bool):
    return revify.plain_autograd() if plain else contextlib.nullcontext()


def _weights(y: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).view_as(y)


def _step(model: nn.Module, x: torch.Tensor, plain: bool, seed: int = 1):
    """Output and gradients (every parameter, then the input) of a fixed projection of the
    output, from the same buffers and RNG state each call; checks the plan ran as set."""
    state = bn_state(model)
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    with _mode(plain):
        y = model(x)
    if not plain:
        _assert_ran_as_planned(model, y)
    else:  # the reference is ordinary autograd, whatever the plan
        assert _graph(y) == (set(), set())
    out = y if y.dtype in (F64, torch.float32) else y.float()  # bf16 under autocast
    grads = torch.autograd.grad((out * _weights(out)).sum(), [*params, x])
    restore(model, state)
    return y.detach(), grads


def _assert_matches_plain(model: nn.Module, x: torch.Tensor, tol: float = 1e-10) -> None:
    model.train()
    y_ref, g_ref = _step(model, x, plain=True)
    y, g = _step(model, x, plain=False)
    assert torch.equal(y, y_ref)
    assert max_rel_err(g, g_ref) < tol
    assert g_ref[-1].abs().sum() > 0  # the input's gradient is not vacuous


# 1. Whole plans --------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", ["checkpoint", "store", "mixed", "mixed-shifted"])
@pytest.mark.parametrize("name", list(MODELS))
def test_plan_matches_plain_autograd(zoo, name, plan):
    model = zoo(name)
    if plan.startswith("mixed"):
        treatments = _mixed(model, 0 if plan == "mixed" else 2)
    else:
        treatments = _uniform(model, plan)
    _treat(model, treatments)
    _assert_matches_plain(model, _input())


def test_convert_plan_installs_the_treatments():
    """The public path: ``convert(model, x, plan=...)``, a dict or a ``MemoryPlan`` (its JSON
    round trip); steps not named keep convert's defaults."""
    x = _input()
    model = _build("timm-resnet18", plan={"stem": "store", "layer1": "checkpoint:1",
                                          "layer3": "checkpoint", "layer2 -> layer3": "store"})
    want = {"stem": "store", "layer1": "checkpoint:1", "layer1 -> layer2": "checkpoint",
            "layer2": "reversible", "layer2 -> layer3": "store", "layer3": "checkpoint",
            "layer3 -> layer4": "checkpoint", "layer4": "reversible"}
    assert revify.memory_plan(model).treatments == want
    assert {st.name: st.treatment for st in revify.stages(model)} == {
        k: v for k, v in want.items() if k.startswith("layer") and "->" not in k}
    assert {s.name: s.checkpoint for s in _plan(model).segments} == {
        k: v == "checkpoint" for k, v in want.items() if k == "stem" or "->" in k}
    _assert_matches_plain(model, x)
    again = _build("timm-resnet18",
                   plan=revify.MemoryPlan.from_json(revify.memory_plan(model).to_json()))
    assert revify.memory_plan(again).treatments == want


# 2. Per stage, per unit ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hand", "hand-revnet"])
def test_every_partial_checkpoint_of_each_stage(zoo, name):
    """One stage treated, the others reversible: ``checkpoint:k`` for every k (unit k-1 the
    last checkpointed, unit k the first stored), store and checkpoint."""
    model = zoo(name)
    x = _input()
    for stage in revify.stages(model):
        n = len(stage.units)
        assert n >= 4
        for t in [f"checkpoint:{k}" for k in range(n + 1)] + ["store", "checkpoint"]:
            _treat(model, {stage.name: t})
            _assert_matches_plain(model, x)


def test_each_stage_alone(zoo):
    """One stage treated, the others reversible, for each ConvNeXt stage (2, 2, 6 and 2
    units): its first unit checkpointed, the rest stored."""
    model = zoo("convnext-faithful")
    x = _input()
    for stage in revify.stages(model):
        assert len(stage.units) >= 2
        _treat(model, {stage.name: "checkpoint:1"})
        _assert_matches_plain(model, x)


def test_checkpointed_unit_that_calls_no_module():
    """Units reading only parameters of the root (``x + self.a * tanh(x)``) have no module of
    their own; checkpointing them works as for any unit."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.a = nn.Parameter(torch.tensor(0.7))
            self.b = nn.Parameter(torch.randn(4, 1, 1))
            self.c = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            x = x + self.a * torch.tanh(x)
            x = x + torch.sin(x * self.b)
            x = x + self.c(x)
            return x.mean((1, 2, 3))

    torch.manual_seed(0)
    model = Net().double()
    x = _input(size=8)
    revify.convert(model, x, plan={})
    (stage,) = revify.stages(model)
    assert [u.modules for u in stage.units[:2]] == [[], []]
    for t in ["checkpoint", "checkpoint:1", "checkpoint:2", "store"]:
        _treat(model, {stage.name: t})
        _assert_matches_plain(model, x)


def test_frozen_units_in_a_checkpointed_stage(zoo):
    """Units whose parameters are all frozen (fine-tuning) checkpoint with no parameter
    among their Segment's inputs; the gradients of the rest and of the input are plain's."""
    model = zoo("hand")
    first, second = revify.stages(model)
    _treat(model, {first.name: "checkpoint", second.name: "checkpoint:2"})
    frozen = [*model.f1.parameters(), *model.blocks.parameters(), *model.blocks2[0].parameters()]
    for p in frozen:
        p.requires_grad_(False)
    try:
        _assert_matches_plain(model, _input())
    finally:
        for p in frozen:
            p.requires_grad_(True)


@pytest.mark.filterwarnings("default::RuntimeWarning")
def test_a_checkpointed_unit_whose_recompute_differs_is_reported():
    """The stage's ``on_mismatch`` reaches its units' Segments: "warn" names the unit,
    "raise" raises."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BNBlock(4), CountingBlock(4),
                          BNBlock(4)).double()
    x = _input(size=8)
    revify.convert(model, x, plan={})
    (stage,) = revify.stages(model)
    assert len(stage.units) == 3
    _treat(model, {stage.name: "checkpoint"})
    with pytest.warns(RuntimeWarning, match=r"segment .*:2: the activations recomputed in"):
        model(x).square().sum().backward()
    stage.on_mismatch = "raise"
    with pytest.raises(RuntimeError, match=r"segment .*:2: the activations recomputed in"):
        model(x).square().sum().backward()


# 3. BatchNorm running statistics ---------------------------------------------------------------


def _bn_calls(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often one forward calls each BatchNorm (``f1`` twice), from an eval forward."""
    calls: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
    ]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train()
        for h in hooks:
            h.remove()
    assert calls and set(calls.values()) <= {1, 2}
    return calls


def _training_step(model: nn.Module, x: torch.Tensor, plain: bool, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with _mode(plain):
        y = model(x)
    (y * _weights(y)).sum().backward()
    return bn_state(model), [p.grad for p in model.parameters()]


def _assert_buffers_like_plain(model: nn.Module, x: torch.Tensor, calls: dict[str, int],
                               steps: int = 2) -> None:
    """Each training step leaves every buffer as a plain_autograd step from the same state
    does: running statistics updated once per call of the BatchNorm in the forward
    (num_batches_tracked counts them; ``f1`` is called twice), never in the backward."""
    for step in range(steps):  # the first step copies every buffer, later ones those written
        start = bn_state(model)
        ref, ref_grads = _training_step(model, x, plain=True, seed=step)
        restore(model, start)
        now, grads = _training_step(model, x, plain=False, seed=step)
        assert now.keys() == ref.keys()
        for k in ref:
            assert torch.equal(now[k], ref[k]), (step, k)
        for n, count in calls.items():
            k = f"{n}.num_batches_tracked"
            assert int(now[k]) == int(start[k]) + count, (step, k)
        moved = [k for k in ref if k.endswith("running_mean")]
        assert moved and all(not torch.equal(now[k], start[k]) for k in moved)
        assert max_rel_err(grads, ref_grads) < 1e-10


@pytest.mark.parametrize("name, treatment", [
    *(("hand", t) for t in ["checkpoint", "checkpoint:2", "store", "mixed"]),
    ("timm-resnet18", "mixed"),
])
def test_running_statistics_updated_once(name, treatment):
    model = _build(name)
    _treat(model, _stagewise(model, treatment))
    x = _input()
    _assert_buffers_like_plain(model, x, _bn_calls(model, x))


@pytest.mark.parametrize("treatment", ["checkpoint", "checkpoint:2"])
def test_exact_grid_redone_in_a_checkpointed_stage(treatment, monkeypatch):
    """Far too little headroom: every exact forward is redone on a coarser grid, with the
    checkpointed units' Segments run again; statistics are still updated once, and the
    gradients are plain autograd's."""
    redone = []
    regrid = revify._exact.regrid
    monkeypatch.setattr(revify._exact, "regrid",
                        lambda *a: (lambda g: redone.append(g is not None) or g)(regrid(*a)))
    model = _build("hand")
    _treat(model, {st.name: treatment for st in revify.stages(model)})
    x = _input()
    calls = _bn_calls(model, x)
    assert not any(redone)
    monkeypatch.setattr(revify._exact, "HEADROOM_BITS", -2)
    _assert_buffers_like_plain(model, x, calls)
    assert sum(redone) >= 4  # each training forward of each stage was redone
    _assert_matches_plain(model, x)


# 4. bf16 autocast ------------------------------------------------------------------------------


def _stagewise(model: nn.Module, treatment: str) -> dict[str, str]:
    """``treatment`` on every stage (a partial checkpoint where a stage has enough units, else
    the whole stage checkpointed), or ``"mixed"``."""
    if treatment == "mixed":
        return _mixed(model, 0)
    k = int(treatment.partition(":")[2] or 0)
    return {st.name: treatment if k <= len(st.units) else "checkpoint"
            for st in revify.stages(model)}


@pytest.mark.parametrize("name, treatment", [
    *(("hand", t) for t in ["reversible", "checkpoint", "checkpoint:2", "store", "mixed"]),
    *(("timm-resnet18", t) for t in ["reversible", "mixed"]),
])
def test_bf16_autocast(name, treatment):
    """Under CPU bf16 autocast each treatment is compared per tensor with plain_autograd under
    the same autocast, on the scale of bf16's own error (plain autograd in bf16 against the
    float64 reference): store runs plain autograd's ops (bit for bit); checkpoint the same ops,
    its gradients summed in another order (a few bf16 roundings apart: well below bf16's
    error); reversible rebuilds its states (further apart, its error against float64 within 2x
    that of plain autograd, the project's ratio)."""
    size = 48 if name == "timm-resnet18" else 32  # 32 px: 1x1 BatchNorm inputs in layer4
    model = _build(name, torch.float32, size=size)
    x = _input(4, torch.float32, size=size)
    _treat(model, _stagewise(model, treatment))
    # the float64 reference: the same converted function, ordinary autograd, no autocast
    _, g64 = _step(copy.deepcopy(model).double(), x.double(), plain=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, g_ref = _step(model, x, plain=True)
        y, g = _step(model, x, plain=False)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)  # the forward computes the same in every treatment
    rebuilds = any(st.treatment == "reversible" for st in revify.stages(model))
    share = 1.0 if rebuilds else 0.0 if treatment == "store" else 0.25
    names = [n for n, _ in model.named_parameters()] + ["input"]
    compared = 0
    for n, a, b, c in zip(names, g, g_ref, g64, strict=True):
        if treatment == "store":
            assert torch.equal(a, b), n
        bf16_error = max_rel_err([b.double()], [c])
        assert bf16_error > 0, n  # bf16 really ran
        if bf16_error >= 0.5:  # noise (a BatchNorm bias summed over the batch): no scale
            continue
        compared += 1
        err = max_rel_err([a], [b])
        assert err <= share * bf16_error, (n, err, bf16_error)
        assert max_rel_err([a.double()], [c]) <= 2 * bf16_error, n
    assert compared >= 0.9 * len(names)


# 5. Parameter hooks ----------------------------------------------------------------------------


def test_parameter_hooks_in_checkpointed_stages_run_once():
    """A gradient-scaling hook (``lambda g: 2 * g``) on parameters of checkpointed units runs
    once per backward: the gradient is twice plain autograd's unhooked one, not four times.
    ``f1`` is used by units 0 and 4 of the first stage (both checkpointed): its hook sees the
    sum of both once. The second stage checkpoints its first two units and stores the rest."""
    model = _build("hand")
    first, second = revify.stages(model)
    _treat(model, {first.name: "checkpoint", second.name: "checkpoint:2"})
    hooked = {
        "shared f1 (units 0, 4)": model.f1[0].weight,
        "blocks.0 (unit 2)": model.blocks[0].conv.weight,
        "blocks2.0 (checkpointed)": model.blocks2[0].conv.weight,
        "blocks2.2 (stored)": model.blocks2[2].conv.weight,
        "stem segment": model.stem[0].weight,
    }
    x = _input()

    def step(plain: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        state = bn_state(model)
        _, grads = _training_step(model, x, plain=plain, seed=1)
        restore(model, state)
        named = dict(zip([n for n, _ in model.named_parameters()], grads, strict=True))
        return {k: named[n].clone() for k, n in names.items()}, dict(calls)

    by_id = {id(p): n for n, p in model.named_parameters()}
    names = {k: by_id[id(p)] for k, p in hooked.items()}
    calls = dict.fromkeys(hooked, 0)
    unhooked, _ = step(plain=True)
    handles = [
        p.register_hook(lambda g, k=k: (calls.__setitem__(k, calls[k] + 1), 2 * g)[1])
        for k, p in hooked.items()
    ]
    try:
        plain, plain_calls = step(plain=True)
        calls.update(dict.fromkeys(hooked, 0))
        treated, treated_calls = step(plain=False)
    finally:
        for h in handles:
            h.remove()
    assert plain_calls == dict.fromkeys(hooked, 1)
    assert treated_calls == dict.fromkeys(hooked, 1)
    for k in hooked:
        assert max_rel_err([treated[k]], [2 * unhooked[k]]) < 1e-10, k
        assert max_rel_err([treated[k]], [plain[k]]) < 1e-10, k


# 6. Higher-order gradients ---------------------------------------------------------------------


def _penalty_grads(model: nn.Module, x: torch.Tensor, plain: bool):
    """Gradients of ``out + |d out / d x|^2`` (a gradient penalty) in every parameter and x."""
    state = bn_state(model)
    x = x.detach().clone().requires_grad_(True)
    params = list(model.parameters())
    torch.manual_seed(1)
    with _mode(plain):
        y = model(x)
        if not plain:
            _assert_ran_as_planned(model, y)
        out = (y.tanh() * _weights(y)).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        grads = torch.autograd.grad(out + gx.square().sum(), [*params, x])
    restore(model, state)
    return gx.detach(), grads


@pytest.mark.parametrize("name, treatment", [
    ("hand", "checkpoint"), ("hand", "mixed"), ("hand-revnet", "checkpoint"),
    ("hand-revnet", "mixed"), ("timm-resnet18", "checkpoint"),
])
def test_gradient_penalty_through_checkpointed_stages_matches_plain(zoo, name, treatment):
    """create_graph=True through checkpointed (and stored) stages gives plain autograd's
    second-order gradients: a checkpointed unit's backward under create_graph recomputes with
    grad (checkpoint.py ``_segment_backward_graph``)."""
    model = zoo(name)
    stages = revify.stages(model)
    if treatment == "checkpoint":
        plan = {st.name: "checkpoint" for st in stages}
    else:  # partial and full checkpoints, stored stages and segments
        kinds = itertools.cycle(["checkpoint:1", "store", "checkpoint"])
        plan = {st.name: next(kinds) for st in stages}
        plan.update({s.name: "store" for s in _plan(model).segments[1::2]})
    _treat(model, plan)
    x = _input()
    gx_ref, ref = _penalty_grads(model, x, plain=True)
    gx, grads = _penalty_grads(model, x, plain=False)
    assert max_rel_err([gx], [gx_ref]) < 1e-10
    assert max_rel_err(grads, ref) < 1e-10


def test_gradient_penalty_through_a_reversible_stage_still_raises(zoo):
    model = zoo("hand")
    first, second = revify.stages(model)
    _treat(model, {first.name: "checkpoint", second.name: "reversible"})
    with pytest.raises(RuntimeError, match=rf"stage {second.name}.*revify\.plain_autograd\(\)"):
        _penalty_grads(model, _input(), plain=False)


# 7. Bad plans ----------------------------------------------------------------------------------


def _snapshot(model: nn.Module):
    return (
        {n: vars(m).keys() - {"training"} for n, m in model.named_modules()},
        {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
    )


def _assert_untouched(model: nn.Module, before, original: nn.Module) -> None:
    attrs, state = before
    assert not plans(model) and not revify.stages(model)
    assert {n: vars(m).keys() - {"training"} for n, m in model.named_modules()} == attrs
    now = model.state_dict(keep_vars=True)
    assert now.keys() == state.keys()
    for k, (t, value) in state.items():
        assert now[k] is t and torch.equal(t, value), k
    x = _input()
    model.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


# HandNet's steps: stem, f1..f1 (5 units), f1..f1 -> blocks2.0..f3, blocks2.0..f3 (4), tail
@pytest.mark.parametrize("plan, named", [
    ({"layer9": "checkpoint"}, r"steps this model does not have: 'layer9'"),
    ({"f1..f1": "chekpoint"}, r"stage f1\.\.f1: unknown treatment 'chekpoint'"),
    ({"f1..f1": "checkpoint:6"}, r"'checkpoint:6'.*<= 5"),
    ({"f1..f1": "checkpoint:-1"}, r"'checkpoint:-1'"),
    ({"f1..f1": "checkpoint:"}, r"'checkpoint:'"),
    ({"f1..f1": 2}, r"unknown treatment '2'"),
    ({"stem": "reversible"}, r"segment stem: unknown treatment 'reversible'"),
    ({"tail": "checkpoint"}, r"segment tail cannot be checkpointed"),
    ({"stem": "store", "blocks2.0..f3": "checkpoint:1", "f1..f1": "bogus"}, r"'bogus'"),
])
def test_bad_plan_raises_and_leaves_the_model_unconverted(plan, named):
    model = _randomise_norms(_hand()).double()
    original = copy.deepcopy(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=named):
        revify.convert(model, _input(), plan=plan)
    _assert_untouched(model, before, original)


def test_plan_of_the_wrong_type_raises_and_leaves_the_model_unconverted():
    model = _randomise_norms(_hand()).double()
    original = copy.deepcopy(model)
    before = _snapshot(model)
    with pytest.raises(TypeError, match="plan must be"):
        revify.convert(model, _input(), plan=[("stem", "store")])
    _assert_untouched(model, before, original)


def test_bad_treatment_on_a_converted_model_changes_nothing(zoo):
    """Validation comes first: a plan with one bad entry sets none of its good ones, and a bad
    treatment set on a stage directly leaves the stage's treatment as it was."""
    model = zoo("timm-resnet50")
    before = _treat(model, {"layer1": "checkpoint:1"})
    with pytest.raises(ValueError, match="'checkpoint:6'"):  # layer3 has 5 units
        planner.apply(_plan(model), {"layer1": "store", "stem": "store", "layer3": "checkpoint:6"})
    assert revify.memory_plan(model).treatments == before
    layer1 = revify.stages(model)[0]
    with pytest.raises(ValueError, match=r"stage layer1: unknown treatment 'bogus'"):
        layer1.treatment = "bogus"
    assert layer1.treatment == "checkpoint:1"
    _assert_matches_plain(model, _input())


# 8. Memory -------------------------------------------------------------------------------------


def test_memory_checkpoint_and_reversible_store_less_than_store():
    """Deterministic byte counts on fake tensors. ``revify.audit``: in saved bytes (total and
    per stage) and step peak, reversible < checkpoint < store, and its rows name the
    treatments. ``_costs.measure`` (what the planner composes): each further unit
    checkpointed (``checkpoint:k``) leaves the stage holding less, and the peak no higher."""
    torch.manual_seed(0)
    model = _randomise_norms(HandNet())
    x = torch.randn(4, 3, 64, 64)
    revify.convert(model, x)
    first, second = revify.stages(model)
    label = {"reversible": "reversible", "checkpoint": "checkpointed", "store": "unchanged"}
    found = {}
    for t in label:
        _treat(model, {first.name: t, second.name: t})
        report = revify.audit(model, x)
        per_stage = {}
        for st in (first, second):
            rows = [r for r in report.rows if r.step == st.name]
            assert {r.treatment for r in rows if r.kind == "block"} == {label[t]}
            per_stage[st.name] = sum(r.bytes_after for r in rows)
        found[t] = (report.saved_after, report.step_peak_after, per_stage)
    rev, ckpt, store = (found[t] for t in label)
    assert 0 < rev[0] < ckpt[0] < store[0]
    assert 0 < rev[1] < ckpt[1] < store[1]
    for st in (first.name, second.name):
        assert 0 < rev[2][st] < ckpt[2][st] < store[2][st], st
    speed = _costs.Speed(flops=1e12, bandwidth=1e11, launch=1e-6, device="cpu")
    held, peaks = [], []
    n = len(first.units)
    for k in range(n + 1):
        _treat(model, {first.name: f"checkpoint:{k}"})
        kinds = [b.treatment for b in _plan(model).blocks if b.step == first.name]
        assert kinds == ["checkpointed"] * k + ["unchanged"] * (n - k)  # per unit
        m = _costs.measure(model, tuple(x.shape), x.dtype, x.device, speed)
        held.append(m.steps[first.name].held)
        peaks.append(m.peak)
    assert all(a > b for a, b in itertools.pairwise(held)), held
    # no higher, up to the 0-dim bookkeeping tensors of a step (a few bytes; a unit is ~50 KB)
    assert all(a >= b - 64 for a, b in itertools.pairwise(peaks)) and peaks[0] > peaks[-1], peaks
