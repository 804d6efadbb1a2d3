"""The reversible function behaves like ordinary autograd towards its caller (DESIGN.md §6)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import (
    InlineNet,
    ReluBlock,
    bn_state,
    counting,
    max_rel_err,
    restore,
    step_grads,
    timm_model,
)
from hypothesis import example, given
from hypothesis import strategies as st

import revify
from revify.checkpoint import _CheckpointFunction
from revify.coupling import _join_bf16, _split_bf16, _UnitStep

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
        model.get_submodule(path).register_forward_hook(counting(
            lambda m, i, o, path=path: counts.__setitem__(path, counts[path] + 1)
        ))
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
        model.get_submodule(path).register_forward_hook(counting(
            lambda m, i, o, path=path: counts.__setitem__(path, counts[path] + 1)
        ))
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


def test_bfloat16_autocast_stage_keeps_fp32_state_once():
    """Under bf16 autocast a stage keeps x_{n-1} in fp32 and x_n as its bf16 output plus an
    int16 rest (NOTE [ bf16 stage output ]): the streams stay fp32 (DESIGN.md §3), and x_n's
    top half is the very tensor the next layer saves, not a second copy."""
    model = timm_model("resnet18", zero_init_last=False)
    revify.convert(model, torch.zeros(2, 3, SIZE, SIZE), coupling="revnet")  # no remainders
    model.train()
    stage_names = {stage.name for stage in revify.stages(model)}
    saved: dict[str | None, list[torch.Tensor]] = {}

    def pack(t):
        saved.setdefault(revify._mode.current_step.get(), []).append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(torch.randn(2, 3, SIZE, SIZE))
    assert stage_names and stage_names <= saved.keys()
    others = {t.untyped_storage().data_ptr() for step, ts in saved.items()
              if step not in stage_names for t in ts}
    for name in stage_names:
        x_prev, out, rest = saved[name]
        assert (x_prev.dtype, out.dtype, rest.dtype) == (torch.float32, torch.bfloat16, torch.int16)
        assert out.shape == rest.shape == x_prev.shape
        if name != "layer4":  # the head keeps no activation of this size
            assert out.untyped_storage().data_ptr() in others
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    for stage in revify.stages(model):
        assert float(stage.last_reconstruction_error) < 1e-3


def test_bfloat16_stage_output_same_on_every_path():
    """The reversible path, ordinary autograd (``plain_autograd``) and a no-grad forward round
    the fp32 state to the bf16 output the same way, ties included."""
    model = timm_model("resnet18", zero_init_last=False)
    revify.convert(model, torch.zeros(2, 3, SIZE, SIZE))
    model.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    outs = []
    for ctx in (contextlib.nullcontext(), revify.plain_autograd(), torch.no_grad()):
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model.forward_features(x))
    assert outs[0].dtype == torch.bfloat16
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


_TIES = [0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x7F7F8000, 0x00008000]
_ODD = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8000, 0x7FC00000, 0x7F800000, 0xFF800000, 0x80000000, 0]


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
@example(_TIES + _ODD)
def test_bf16_split_gives_the_fp32_state_back_bit_for_bit(patterns):
    """``_split_bf16`` rounds to the nearest bf16 (ties away from zero) and, with its int16
    rest, gives every fp32 bit pattern back; NaNs stay NaN."""
    bits = torch.tensor(patterns, dtype=torch.int64)
    x = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    hi, rest = _split_bf16(x)
    back = _join_bf16(hi, rest)
    nan = x.isnan()
    assert torch.equal(back.isnan(), nan) and torch.equal(hi.isnan(), nan)
    assert torch.equal(back[~nan].view(torch.int32), x[~nan].view(torch.int32))
    x, hi = x[~nan].double(), hi[~nan].double()
    rne = x.float().to(torch.bfloat16).double()
    differ = hi != rne  # only on ties, where hi is the one away from zero
    assert torch.equal((x - rne).abs()[differ], (x - hi).abs()[differ])
    assert (hi[differ].abs() > rne[differ].abs()).all()


def test_output_modified_in_place_is_refused_in_backward():
    """A stage keeps its output as part of its state: changing it in place after the stage is
    an error in backward, as it is for any tensor autograd saved."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                *(ReluBlock(8) for _ in range(3)))
    revify.convert(model, torch.zeros(2, 3, 8, 8))
    assert len(revify.stages(model)) == 1
    y = model(torch.randn(2, 3, 8, 8))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place after the stage"):
        y.sum().backward()


def test_second_backward_through_a_final_stage_says_so():
    """When the stage's node is the first a second backward reaches, autograd's own error
    about freed saved tensors comes through, not the in-place one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                *(ReluBlock(8) for _ in range(3)))
    revify.convert(model, torch.zeros(2, 3, 8, 8))
    y = model(torch.randn(2, 3, 8, 8))
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def test_retain_graph_keeps_every_saved_state_of_a_long_stage():
    """A stage of five units: its first backward must not write into the saved x_{n-1}
    (NOTE [ Saved states ]), or the second backward rebuilds from overwritten states."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), *(ReluBlock(8) for _ in range(5)),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 3),
    ).double()
    revify.convert(m, torch.zeros(2, 3, 8, 8, dtype=torch.float64))
    assert [len(s.units) for s in revify.stages(m)] == [5]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    params = list(m.parameters())
    with revify.plain_autograd():
        ref = torch.autograd.grad(m(x).square().sum(), params)
    y = m(x).square().sum()
    first = torch.autograd.grad(y, params, retain_graph=True)
    second = torch.autograd.grad(y, params)
    assert max_rel_err(first, ref) < 1e-10
    assert max_rel_err(second, ref) < 1e-10
