"""The reversible function behaves like ordinary autograd towards its caller (DESIGN.md §6)."""

from __future__ import annotations

import pytest
import torch
from conftest import InlineNet, bn_state, max_rel_err, restore, step_grads, timm_model

import revify
from revify.checkpoint import _CheckpointFunction
from revify.coupling import _UnitStep

SIZE = 32


@pytest.fixture
def model():
    m = timm_model("resnet18", drop_path_rate=0.2).double()
    revify.convert(m, torch.zeros(2, 3, SIZE, SIZE, dtype=torch.float64))
    return m.train()


def _x(requires_grad=False):
    torch.manual_seed(3)
    return torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, requires_grad=requires_grad)


def test_autograd_grad_returns_parameter_gradients_and_assigns_no_grad(model):
    params = list(model.parameters())
    x = _x()
    _, ref = step_grads(model, x, plain=True)
    torch.manual_seed(1)
    y = model(x)
    w = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).view_as(y)
    grads = torch.autograd.grad((y * w).sum(), params)
    assert all(g is not None for g in grads)
    assert max_rel_err(grads, ref[:-1]) < 1e-10
    assert all(p.grad is None for p in params)


def test_input_without_grad_still_trains_parameters(model):
    x = _x(requires_grad=False)
    y = model(x)
    assert y.requires_grad
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert x.grad is None


def test_retain_graph_second_backward_matches_first(model):
    x = _x(requires_grad=True)
    y = model(x)
    y.sum().backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    y.sum().backward()
    for p, g in zip(model.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-10, atol=1e-12)


def test_second_backward_without_retain_graph_raises(model):
    y = model(_x(requires_grad=True))
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def test_caller_tensors_are_not_modified(model):
    x = _x(requires_grad=True)
    x_before = x.detach().clone()
    feats = model.forward_features(x)
    feats_before = feats.detach().clone()
    feats.sum().backward()
    assert torch.equal(x.detach(), x_before)
    assert torch.equal(feats.detach(), feats_before)


def test_no_grad_and_eval_run_plain_forward(model, monkeypatch):
    calls = []
    monkeypatch.setattr(
        _UnitStep, "apply", lambda *a: calls.append(a) or pytest.fail("apply called")
    )
    monkeypatch.setattr(
        _CheckpointFunction, "apply", lambda *a: calls.append(a) or pytest.fail("apply called")
    )
    model.eval()
    with torch.no_grad():
        y = model(_x())
    assert y.grad_fn is None and not calls
    with revify.plain_autograd():
        y_ref = model(_x())
    torch.testing.assert_close(y, y_ref.detach(), rtol=0, atol=0)


def test_frozen_parameters_cost_no_recompute(model):
    """A frozen trunk start with an input that needs no grad is never recomputed."""
    for name, p in model.named_parameters():
        if not name.startswith(("layer3", "layer4", "fc")):
            p.requires_grad_(False)
    counts = {"layer1.0": 0, "layer2.1": 0, "layer4.1": 0}
    for path in counts:
        model.get_submodule(path).register_forward_hook(
            lambda m, i, o, path=path: counts.__setitem__(path, counts[path] + 1)
        )
    y = model(_x())
    assert counts == {"layer1.0": 1, "layer2.1": 1, "layer4.1": 1}
    y.sum().backward()
    assert counts["layer1.0"] == 1 and counts["layer2.1"] == 1  # not recomputed
    assert counts["layer4.1"] == 2  # recomputed once for its backward
    assert all(p.grad is None for p in model.layer1.parameters())
    assert model.layer4[1].conv1.weight.grad is not None


def test_frozen_parameters_gradients_still_match(model):
    for p in model.layer2.parameters():
        p.requires_grad_(False)
    _, ref = step_grads(model, _x(), plain=True)
    _, rev = step_grads(model, _x(), plain=False)
    assert max_rel_err(rev, ref) < 1e-10


def test_each_unit_recomputed_exactly_once(model):
    counts = {}
    for path in ("layer1.0", "layer1.1", "layer2.0", "conv1"):
        counts[path] = 0
        model.get_submodule(path).register_forward_hook(
            lambda m, i, o, path=path: counts.__setitem__(path, counts[path] + 1)
        )
    model(_x(requires_grad=True)).sum().backward()
    assert counts == {"layer1.0": 2, "layer1.1": 2, "layer2.0": 2, "conv1": 2}


def test_batchnorm_statistics_updated_once_per_step():
    for model, calls in ((timm_model("resnet50", drop_path_rate=0.2), 1), (InlineNet(), None)):
        example = torch.zeros(2, 3, SIZE, SIZE)
        revify.convert(model, example)
        model.train()
        x = torch.randn(4, 3, SIZE, SIZE)
        start = bn_state(model)
        torch.manual_seed(0)
        with torch.no_grad():
            model(x)
        forward_only = bn_state(model)
        restore(model, start)
        torch.manual_seed(0)
        model(x).sum().backward()
        after_step = bn_state(model)
        changed = [k for k in start if not torch.equal(start[k], forward_only[k])]
        assert any("running_mean" in k for k in changed)
        for k in start:
            torch.testing.assert_close(after_step[k], forward_only[k], rtol=0, atol=1e-6)
            if calls and "num_batches_tracked" in k:  # InlineNet calls its f1 twice
                assert int(after_step[k]) == int(start[k]) + calls


def test_dropout_masks_replayed():
    """With dropout active, revify's gradients equal ordinary autograd's only if masks replay."""
    torch.manual_seed(0)
    model = InlineNet().double()
    model.drop.p = 0.5
    revify.convert(model, torch.zeros(2, 3, 16, 16, dtype=torch.float64))
    model.train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    _, ref = step_grads(model, x, plain=True, seed=5)
    _, rev = step_grads(model, x, plain=False, seed=5)
    assert max_rel_err(rev, ref) < 1e-10
    _, other = step_grads(model, x, plain=True, seed=6)
    assert max_rel_err(other, ref) > 1e-3  # the masks matter


def test_rng_stream_of_caller_unchanged_by_backward(model):
    """Replaying masks must not rewind or advance the caller's generator."""
    x = _x(requires_grad=True)
    torch.manual_seed(7)
    y = model(x)
    expected = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), expected)


def test_bfloat16_autocast_streams_stay_fp32():
    """Under bf16 autocast the stored stage states are fp32 (DESIGN.md §3)."""
    model = timm_model("resnet18")
    revify.convert(model, torch.zeros(2, 3, SIZE, SIZE))
    model.train()
    stage_names = {st.name for st in revify.stages(model)}
    stored = []

    def pack(t):
        if revify._mode.current_step.get() in stage_names:
            stored.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(torch.randn(2, 3, SIZE, SIZE))
    assert stored and set(stored) == {torch.float32}
    y.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
