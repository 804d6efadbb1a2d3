"""Direct module calls (NOTE [ Direct calls ] in revify/_direct.py, issue 14).

Generated code and whole-module units call their modules' ``forward`` directly when
``nn.Module.__call__`` would do nothing else. These tests check that doing so changes no value
and no gradient, that every reason ``__call__`` is needed (hooks, compilation, a replaced or
added submodule, an instance-level forward) makes the unit call its module as before, and that
units whose forward cannot be traced faithfully keep calling it.
"""

from __future__ import annotations

import copy
import pickle
import sys

import pytest
import torch
from conftest import counting, max_rel_err, step_grads, timm_model
from torch import nn

import revify

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
_CALL_IMPL = nn.Module._call_impl.__code__


def _module_calls(fn) -> int:
    """How many times ``nn.Module.__call__`` runs during ``fn()``."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event == "call" and frame.f_code is _CALL_IMPL:
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def _units(model: nn.Module) -> list:
    return [u for st in revify.stages(model) for u in st.units]


def _without_programs(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    for u in _units(other):
        u.program = None
    return other


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, nn.Module]:
    """A float64 timm ResNet-26 (non-zero residual branches) and the same model converted."""
    original = timm_model("resnet26", zero_init_last=False).double()
    return original, revify.convert(copy.deepcopy(original), X)


def test_units_run_as_programs_with_the_modules_values_and_gradients(resnet):
    original, model = resnet
    units = _units(model)
    assert units and all(u.program is not None for u in units)
    # the transition block layer2.0 runs in a checkpointed segment, as a program too
    plan = model.__dict__["_revify_plan"]
    transition = [seg for seg in plan.segments if seg.name.startswith("layer1 -> layer2")]
    assert transition and [p for p, _ in transition[0].code.callees.programs] == ["layer2.0"]
    y, g = step_grads(model, X, plain=False)
    y_ref, g_ref = step_grads(_without_programs(model), X, plain=False)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert max_rel_err(g, g_ref) == 0.0
    # and a stage of one unit computes what the original network computes
    y_orig, _ = step_grads(original, X, plain=False)
    assert y.shape == y_orig.shape


def test_direct_calls_skip_module_call_machinery(resnet):
    _, model = resnet

    def step(m):
        return lambda: m(X).sum().backward()

    fewer = _module_calls(step(model))
    more = _module_calls(step(_without_programs(model)))
    # each unit's forward and recompute call their 10+ submodules directly
    assert fewer < more - 10 * len(_units(model))


@pytest.mark.parametrize("where", ["submodule", "unit", "transition", "global"])
def test_hooks_run_as_they_would_without_direct_calls(resnet, where):
    _, converted = resnet
    counts = []
    for model in (copy.deepcopy(converted), _without_programs(converted)):
        calls = []
        unit = _units(model)[1].module
        @counting  # the stages stay reversible: their direct calls are what is tested
        def hook(m, args, out, calls=calls):
            calls.append(type(m).__name__)

        if where == "submodule":
            handle = unit.conv1.register_forward_hook(hook)
        elif where == "unit":
            handle = unit.register_forward_hook(hook)
        elif where == "transition":  # in a checkpointed segment, run as a program
            handle = model.layer2[0].conv2.register_forward_hook(hook)
        else:
            handle = nn.modules.module.register_module_forward_hook(hook)
        try:
            y, g = step_grads(model, X, plain=False)
        finally:
            handle.remove()
        counts.append((calls, y, g))
    (calls, y, g), (calls_ref, y_ref, g_ref) = counts
    assert calls and calls == calls_ref
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert max_rel_err(g, g_ref) == 0.0


class _Block(nn.Module):
    """``relu(x + bn(conv(x)))``, with an optional extra branch that may be set later."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.extra = None

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.extra is not None:
            y = y + self.extra(x)
        return torch.relu(x + y)


class _Net(nn.Module):
    def __init__(self, block=_Block, n: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(*[block() for _ in range(n)])
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _reference(model: nn.Module) -> tuple[torch.Tensor, tuple]:
    return step_grads(_without_programs(model), X, plain=False)


def test_a_submodule_added_after_convert_is_run():
    torch.manual_seed(0)
    model = revify.convert(_Net().double(), X)
    assert all(u.program is not None for u in _units(model))
    y_before, _ = step_grads(model, X, plain=False)
    model.blocks[1].extra = nn.Conv2d(4, 4, 1).double()
    y, g = step_grads(model, X, plain=False)
    y_ref, g_ref = _reference(model)
    assert (y - y_before).abs().max() > 1e-3  # the new branch counts
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert max_rel_err(g, g_ref) == 0.0


def test_a_replaced_leaf_and_an_instance_forward_are_run():
    torch.manual_seed(0)
    model = revify.convert(_Net().double(), X)
    reference = _without_programs(model)
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    for m in (model, reference):
        m.blocks[0].conv = copy.deepcopy(conv)  # LoRA-style swap
        bn = m.blocks[2].bn
        bn.forward = lambda x, bn=bn: 2 * type(bn).forward(bn, x)
    y, g = step_grads(model, X, plain=False)
    y_ref, g_ref = step_grads(reference, X, plain=False)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert max_rel_err(g, g_ref) == 0.0
    del model.blocks[2].bn.forward
    y_restored, _ = step_grads(model, X, plain=False)
    assert (y - y_restored).abs().max() > 1e-3


def test_a_compiled_submodule_is_called_through_its_compiled_call():
    torch.manual_seed(0)
    model = revify.convert(_Net().double(), X)
    calls = []
    model.blocks[1].conv._compiled_call_impl = lambda *a, **k: calls.append(1) or (
        model.blocks[1].conv.forward(*a, **k))
    with torch.no_grad():  # with grad such a unit is refused (NOTE [ Compiled units ])
        model(X)
    assert calls  # Module.compile() installs _compiled_call_impl; __call__ runs it


class _TrainingBlock(_Block):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(x + (2 * y if self.training else y))


class _AliasBlock(_Block):
    def forward(self, x):
        t = self.conv(x)
        u = t
        t += 1  # torch.fx records t = t + 1: u would still read the old t
        return x + torch.tanh(t * u)


@pytest.mark.parametrize("block", [_TrainingBlock, _AliasBlock])
def test_units_whose_trace_differs_call_their_module(block):
    torch.manual_seed(0)
    original = _Net(block, n=1).double()
    model = revify.convert(copy.deepcopy(original), X)
    (unit,) = _units(model)
    assert unit.program is None
    for train in (True, False):
        original.train(train)
        model.train(train)
        y, g = step_grads(model, X, plain=False)
        y_ref, g_ref = step_grads(original, X, plain=False)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        assert max_rel_err(g, g_ref) < 1e-10


def test_programs_survive_pickling_and_deepcopy(resnet):
    _, model = resnet
    y, g = step_grads(model, X, plain=False)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(u.program is not None for u in _units(other))
        plain = _without_programs(other)
        assert _module_calls(lambda m=other: m(X)) < _module_calls(lambda m=plain: m(X))
        y2, g2 = step_grads(other, X, plain=False)
        torch.testing.assert_close(y2, y, rtol=0, atol=0)
        assert max_rel_err(g2, g) == 0.0


class _ConstantBlock(_Block):
    def forward(self, x):
        return x + torch.tanh(self.conv(x)) * torch.tensor(0.5)


def test_a_unit_with_a_tensor_constant_keeps_its_buffers():
    torch.manual_seed(0)
    model = revify.convert(_Net(_ConstantBlock, n=2).double(), X)
    for unit in _units(model):
        assert unit.program is None
        assert not list(unit.module.buffers(recurse=False))


@pytest.mark.parametrize("kind", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False, "frozen", "dropped"])
def test_direct_batch_norm_is_the_modules_forward(kind, training, momentum, affine, track):
    """NOTE [ Direct BatchNorm ]: output and every buffer bit for bit, over the options."""
    from revify._direct import batch_norm

    torch.manual_seed(0)
    m = kind(3, momentum=momentum, affine=affine, track_running_stats=track is not False)
    if affine:
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
    if track == "frozen":  # revify's recompute: running statistics switched off
        object.__setattr__(m, "track_running_stats", False)
    if track == "dropped":  # statistics removed after construction (eval uses batch stats)
        m.running_mean = m.running_var = None
    m.train(training)
    shape = {nn.BatchNorm1d: (4, 3, 5), nn.BatchNorm2d: (4, 3, 5, 5),
             nn.BatchNorm3d: (2, 3, 2, 3, 3)}[kind]
    x = torch.randn(shape, dtype=torch.float64).requires_grad_()
    m = m.double()
    other = copy.deepcopy(m)
    for _ in range(2):  # twice: the cumulative average reads the count the first call wrote
        got, want = batch_norm(m, x), other.forward(x)
        assert torch.equal(got, want)
        for (name, a), (_, b) in zip(m.named_buffers(), other.named_buffers(), strict=True):
            assert torch.equal(a, b), name
    g = torch.randn_like(got)
    assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


def test_direct_batch_norm_raises_as_the_module_does():
    from revify._direct import batch_norm

    m, other = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    for x, match in ((torch.randn(1, 3, 1, 1), "Expected more than 1 value per channel"),
                     (torch.randn(2, 3, 4), "expected 4D input")):
        with pytest.raises(ValueError, match=match):
            batch_norm(m, x)
        with pytest.raises(ValueError, match=match):
            other(x)
        assert int(m.num_batches_tracked) == int(other.num_batches_tracked)  # written once
