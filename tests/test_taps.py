"""States read outside their stage (NOTE [ Taps ]) and timm's ``forward_intermediates`` run
through the converted stages (NOTE [ Intermediates ])."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import timm
import torch
from conftest import max_rel_err
from torch import nn

import revify


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                               nn.Tanh(), nn.Dropout(0.2))

    def forward(self, x):
        return x + self.f(x)


class _Features(nn.Module):
    """Five blocks in a loop; the outputs of blocks 1 and 3 are read again (a feature list)."""

    def __init__(self, write: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(8) for _ in range(5)])
        self.head = nn.Linear(8, 3)
        self.write = write

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in (1, 3):
                feats.append(x.mul_(1.0) if self.write and i == 1 else x.mean((2, 3)) * 2)
        return self.head(x.mean((2, 3))), feats


def _net(write: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = _Features(write).double().train()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net


def _grads(net: nn.Module, x: torch.Tensor, plain: bool, use_taps: bool = True,
           autocast: bool = False):
    net.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout masks in both runs
    with (revify.plain_autograd() if plain else torch.enable_grad()), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, feats = net(x)
        loss = out.float().square().sum()
        if use_taps:
            loss = loss + sum((f.float() * (k + 1)).sum() for k, f in enumerate(feats))
    loss.backward()
    return loss.detach(), [x.grad, *(p.grad for p in net.parameters())]


def test_states_read_outside_a_chain_are_tapped_not_cut():
    net = _net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    revify.convert(net, x)
    assert [len(st.units) for st in revify.stages(net)] == [5]  # one chain, not three
    step = next(s for s in net.__dict__["_revify_plan"].steps if s.taps)
    assert step.taps == [2, 4]
    for use_taps in (True, False):  # a tap no loss reaches adds nothing
        want_loss, want = _grads(net, x, plain=True, use_taps=use_taps)
        loss, got = _grads(net, x, plain=False, use_taps=use_taps)
        assert torch.allclose(loss, want_loss, rtol=1e-12)
        assert max_rel_err(got, want) < 1e-10
    with torch.no_grad():  # the no-grad path hands out the same states
        torch.manual_seed(7)
        out, feats = net(x)
    torch.manual_seed(7)
    with revify.plain_autograd():
        out2, feats2 = net(x)
    pairs = zip([out, *feats], [out2, *feats2], strict=True)
    assert all(torch.equal(a, b.detach()) for a, b in pairs)


def test_the_tap_of_the_saved_state_is_that_memory_and_outlives_the_backward():
    """x_{n-1} is saved by the stage anyway: handed out without a copy, and the backward builds
    no other state in it (NOTE [ Saved states ]), so a caller holding it sees it unchanged."""
    net = _net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    revify.convert(net, x)
    stage = revify.stages(net)[0]
    h = net.stem(x)
    out, t2, t4 = stage(h, taps=(2, 4))
    saved = {t.untyped_storage().data_ptr() for t in out.grad_fn.saved_tensors}
    assert t4.untyped_storage().data_ptr() in saved  # x_4 = x_{n-1}
    assert t2.untyped_storage().data_ptr() not in saved
    before = t4.detach().clone()
    (out.square().sum() + t2.sum() + t4.sum()).backward()
    assert torch.equal(t4.detach(), before)
    out, _, t4 = stage(net.stem(x), taps=(2, 4))
    t4.detach().mul_(2)  # bypasses the plan's check: the backward says so
    with pytest.raises(RuntimeError, match=r"handed out\) was modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("treatment", ["store", "checkpoint", "checkpoint:3"])
def test_taps_under_every_treatment(treatment):
    net = _net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    revify.convert(net, x)
    _, want = _grads(net, x, plain=True)
    revify.stages(net)[0].treatment = treatment
    _, got = _grads(net, x, plain=False)
    assert max_rel_err(got, want) < 1e-10


def test_taps_under_bf16_autocast_match_plain_autograd():
    net = _net().float()
    x = torch.randn(2, 3, 16, 16)
    revify.convert(net, x)
    _, want = _grads(net, x, plain=True, autocast=True)
    _, got = _grads(net, x, plain=False, autocast=True)
    assert max_rel_err(got, want) < 2e-2


def test_taps_come_from_the_pass_that_kept_its_grid(monkeypatch):
    """An input far below the states the blocks make outgrows the exact grid: the forward is
    redone on a wider one, and the taps handed out are that pass's states."""
    from revify import _exact

    net = _net()
    with torch.no_grad():
        net.stem.bias.zero_()
    x = 1e-9 * torch.randn(2, 3, 16, 16, dtype=torch.float64)
    revify.convert(net, x)
    _, want = _grads(net, x, plain=True)
    redone = []
    regrid = _exact.regrid
    monkeypatch.setattr(_exact, "regrid",
                        lambda *a: redone.append(regrid(*a)) or redone[-1])
    _, got = _grads(net, x, plain=False)
    assert redone[0] is not None and redone[-1] is None  # at least one redo
    assert max_rel_err(got, want) < 1e-10


def test_a_state_written_in_place_outside_is_not_tapped():
    """``x.mul_(1.0)`` on block 1's output changes block 2's input in the original: a copy
    handed out would not, so the chain ends there as before."""
    net = _net(write=True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        revify.convert(net, x)
    assert [len(st.units) for st in revify.stages(net)] != [5]
    _, want = _grads(net, x, plain=True)
    _, got = _grads(net, x, plain=False)
    assert max_rel_err(got, want) < 1e-10


def _vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8,
                              **kw).double()
    with torch.no_grad():  # non-zero layer norms and biases, as trained weights have
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_vit_forward_intermediates_runs_the_converted_stage():
    model = _vit(drop_path_rate=0.2)  # train mode: DropPath active, masks seeded per call
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    revify.convert(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "called the units one by one"
        torch.manual_seed(3)
        final, inter = model.forward_intermediates(x, indices=[0, 5, 11])
    # the same function as the converted forward_features (timm's own test)
    torch.manual_seed(3)
    assert torch.equal(final, model.forward_features(x))
    assert [t.shape for t in inter] == [(2, 192, 4, 4)] * 3
    torch.manual_seed(1)
    weights = [torch.randn_like(t) for t in inter]

    def grads(plain: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        with revify.plain_autograd() if plain else torch.enable_grad():
            final, inter = model.forward_intermediates(x, indices=[0, 5, 11])
            pairs = zip(inter, weights, strict=True)
            loss = final.square().sum() + sum((t * w).sum() for t, w in pairs)
        loss.backward()
        return [p.grad for p in model.parameters()]

    assert max_rel_err(grads(False), grads(True)) < 1e-10
    planned = model.__dict__["forward_intermediates"].plans
    (run, follow), = planned.values()
    assert follow == [] and run.plan.stages[0] is revify.stages(model)[0]  # the trunk's stage
    # stop_early: a leading part of the trunk's stage, with its coefficients
    revify.stages(model)[0].alpha = 0.5
    with torch.no_grad():  # the same masks for the first five blocks
        torch.manual_seed(5)
        early = model.forward_intermediates(x, indices=[1, 4], stop_early=True,
                                            intermediates_only=True)
        torch.manual_seed(5)
        full = model.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
    pairs = zip(early, full, strict=True)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in pairs)
    assert len(planned) == 3
    (own, trunk), = next(f for _, f in planned.values() if f)  # the stop_early plan's stage
    assert own.alpha == 0.5 and len(own.units) == 5
    # the unit modules' programs are the trunk's, not traced and checked again
    assert all(a.program is b.program is not None
               for a, b in zip(own.units, trunk.units[:5], strict=True))


def test_vit_forward_intermediates_saves_a_fraction_of_the_unconverted_activations():
    def saved(model: nn.Module, x: torch.Tensor) -> int:
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        kept: dict[int, torch.Tensor] = {}

        def pack(t):
            if t.untyped_storage()._cdata not in params:
                kept[t.untyped_storage()._cdata] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            final, inter = model.forward_intermediates(x)
            del final, inter
        return sum(t.untyped_storage().nbytes() for t in kept.values())

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = saved(_vit(), x)
    model = revify.convert(_vit(), x)
    after = saved(model, x)
    print(f"forward_intermediates saved for backward: {after / before:.3f}x unconverted")
    assert after <= 0.2 * before


def test_features_only_vit_converts_its_blocks_as_one_stage():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                              features_only=True, out_indices=(3, 7, 11)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = [t.detach() for t in model(x)]
    revify.convert(model, x, coupling="revnet")
    assert [len(st.units) for st in revify.stages(model)] == [12]
    got = model(x)
    assert [t.shape for t in got] == [t.shape for t in want]
    sum(t.square().sum() for t in got).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_planned_intermediates_survive_copies_and_fall_back_with_a_warning():
    model = _vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    revify.convert(model, x)
    model.forward_intermediates(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.__dict__["forward_intermediates"].plans == {}
        torch.testing.assert_close(clone.forward_intermediates(x)[0], model.forward_features(x),
                                   rtol=0, atol=0)
    # an attention mask reaches every block as a traced input: not a side input a stage can
    # take, so the method runs as written, and says so
    mask = torch.zeros(17, 17, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"called the units blocks\.0, blocks\.1, blocks\.2 "):
        model.forward_intermediates(x, attn_mask=mask)
