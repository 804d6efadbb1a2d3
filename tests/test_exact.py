"""Exact fixed-point streams, the faithful setting and the coefficient schedule."""

from __future__ import annotations

import pytest
import torch
from conftest import InlineNet, bn_state, max_rel_err, restore, step_grads, timm_model

import revify

FAITHFUL = dict(alpha=15 / 16, beta=1 / 16, exact=True)


@pytest.mark.parametrize("coeffs", [FAITHFUL, dict(alpha=0.0, beta=1.0, exact=True),
                                    dict(alpha=0.5, beta=1 / 3, exact=True)])
def test_exact_float64_matches_autograd(coeffs):
    name = "resnet50" if coeffs is FAITHFUL else "resnet18"
    model = timm_model(name, drop_path_rate=0.5).double()
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64), **coeffs)
    model.train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y_ref, g_ref = step_grads(model, x, plain=True)
    y_rev, g_rev = step_grads(model, x, plain=False)
    assert torch.equal(y_ref, y_rev)  # the same grid arithmetic in both paths
    assert max_rel_err(g_rev, g_ref) <= 1e-10


def test_exact_inline_units_with_post_activation():
    torch.manual_seed(0)
    model = InlineNet().double()
    revify.convert(model, torch.zeros(2, 3, 16, 16, dtype=torch.float64), **FAITHFUL)
    model.train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    _, ref = step_grads(model, x, plain=True)
    _, rev = step_grads(model, x, plain=False)
    assert max_rel_err(rev, ref) <= 1e-10


class _Scaled(torch.nn.Module):
    """``x + scale * tanh(conv(x) / scale + 1/2)``: a unit whose output dwarfs its input at a
    large ``scale`` while its Lipschitz constant stays the conv's."""

    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * torch.tanh(self.conv(x) / self.scale + 0.5)


def _scaled_net(scale: float, units: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                               *(_Scaled(8, scale) for _ in range(units)))


def test_exact_grid_is_chosen_per_forward():
    """A batch of tiny inputs (its streams grow by 2^20 over the stage, so the forward is redone
    on a coarser grid) leaves no trace: the next batch computes what a fresh model computes."""
    x = torch.randn(2, 3, 16, 16)
    fresh = revify.convert(timm_model("resnet18").eval(), x, **FAITHFUL)
    used = revify.convert(timm_model("resnet18").eval(), x, **FAITHFUL)
    with torch.no_grad():
        used(1e-6 * x)
        assert torch.equal(used(x), fresh(x))
    state = bn_state(used)
    used.train()
    used(1e-6 * x).sum().backward()  # the training path too
    restore(used, state)
    used.eval()
    with torch.no_grad():
        assert torch.equal(used(x), fresh(x))


def test_exact_grid_redone_when_streams_outgrow_it():
    """Streams that grow 2^10 times past the input's scale are redone on a coarser grid, never
    wrapped around: the output is the float coupling's up to the grid's resolution, float64
    gradients equal plain autograd's, and running statistics are updated once."""
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    outs = {}
    for exact in (False, True):
        model = _scaled_net(1000.0).double()
        revify.convert(model, x, alpha=63 / 64, beta=1 / 64, exact=exact)
        with torch.no_grad():
            outs[exact] = model(x)
    assert (outs[True] - outs[False]).abs().max() <= 1e-3 * outs[False].abs().max()
    model = timm_model("resnet18", drop_path_rate=0.5).double()
    with torch.no_grad():
        for block in (model.layer1[0], model.layer1[1]):
            block.bn2.weight.mul_(300.0)  # each unit adds ~300x its input
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64), **FAITHFUL)
    model.train()
    xi = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    start = int(model.layer1[0].bn1.num_batches_tracked)
    _, rev = step_grads(model, xi, plain=False)
    _, ref = step_grads(model, xi, plain=True)
    assert max_rel_err(rev, ref) <= 1e-10
    model(xi)  # one training forward: BatchNorm counted once despite the redo
    assert int(model.layer1[0].bn1.num_batches_tracked) == start + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_exact_non_finite_input_stays_in_its_sample(bad):
    """A NaN or Inf in one sample gives what the unconverted model gives: that sample's
    outputs are not finite, the others' are unaffected (no ValueError from the grid)."""
    x = torch.randn(4, 3, 32, 32)
    x[1, 0, 3, 4] = bad
    model = timm_model("resnet18").eval()
    with torch.no_grad():
        ref = model(x)
    revify.convert(model, x, **FAITHFUL)
    zeroed = x.clone()
    zeroed[1, 0, 3, 4] = 0.0
    with torch.no_grad():
        out = model(x)
        clean = model(zeroed)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert not torch.isfinite(out[1]).any()
    assert torch.equal(out[[0, 2, 3]], clean[[0, 2, 3]])


def test_exact_zero_stage_input():
    """An all-zero stage input (a bias-free stem on a zero image) runs, forward and backward,
    and float64 gradients equal plain autograd's."""
    model = _scaled_net(1.0).double()
    revify.convert(model, torch.zeros(2, 3, 16, 16, dtype=torch.float64), **FAITHFUL)
    x = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    _, rev = step_grads(model, x, plain=False)
    _, ref = step_grads(model, x, plain=True)
    assert max_rel_err(rev, ref) <= 1e-10


def test_small_beta_needs_exact_streams():
    """beta=1/256 over 5 units: float reconstruction explodes, exact streams do not."""
    x = torch.randn(4, 3, 32, 32)
    errors = {}
    for exact in (False, True):
        model = timm_model("resnet50")
        revify.convert(model, torch.zeros(2, 3, 32, 32), alpha=1.0, beta=1 / 256, exact=exact)
        model.train()
        report = revify.check(model, x)
        errors[exact] = max(st.reconstruction_error for st in report.stages)
        if exact:
            assert report.ratio <= 2.0, str(report)
    assert errors[False] > 1.0
    assert errors[True] == 0.0  # exact: the input comes back bit for bit


def test_faithful_setting_stays_close_to_the_original():
    """A smaller beta (alpha = 1 - beta) is closer to the pretrained function; RevNet is far."""
    x = torch.randn(8, 3, 32, 32)
    errors = {}
    finer = {**FAITHFUL, "alpha": 63 / 64, "beta": 1 / 64}
    for name, kw in (("revnet", dict(coupling="revnet")), ("1/16", FAITHFUL), ("1/64", finer)):
        model = timm_model("resnet50").eval()
        revify.convert(model, x[:2], **kw)
        errors[name] = revify.check(model, x, gradients=False)
    assert errors["1/64"].output_rel_error < errors["1/16"].output_rel_error
    assert errors["1/16"].output_rel_error < errors["revnet"].output_rel_error
    assert errors["1/64"].top1_agreement >= errors["revnet"].top1_agreement
    revify.revert(model)
    assert not revify.stages(model)


def test_exact_beta_must_be_reciprocal_integer():
    model = revify.convert(timm_model("resnet18"), torch.zeros(2, 3, 32, 32), **FAITHFUL)
    with pytest.raises(ValueError, match="beta = 1/d"):
        revify.stages(model)[0].beta = 0.3


@pytest.mark.parametrize("d", [2, 4, 16, 64, 37, 256])
@pytest.mark.parametrize("n", [8 * 1001, 8 * 1001 + 3])
def test_remainder_packing_round_trips(d, n):
    from revify import _exact

    rem = torch.randint(0, d, (n,), dtype=torch.int32)
    packed = _exact.pack(rem.clone(), d)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-n * _exact._bits(d) // 8) or n % 8  # whole groups when padded
    assert packed.numel() * 8 >= n * _exact._bits(d)
    assert torch.equal(_exact.unpack(packed, d, n), rem)
    room = torch.empty(n + 8, dtype=torch.int32)  # unpacked into memory the caller lends
    assert torch.equal(_exact.unpack(packed, d, n, into=room), rem)


@pytest.mark.parametrize(("beta", "bits"), [(1 / 16, 4), (1 / 64, 6)])
def test_remainders_are_packed_and_counted(beta, bits):
    """Exact streams cost ceil(log2 d) bits per element per unit beyond the first."""
    model = timm_model("resnet50")
    revify.convert(model, torch.zeros(2, 3, 32, 32), alpha=1 - beta, beta=beta, exact=True)
    stage = revify.stages(model)[2]  # layer3: 5 units, 1024 x 2 x 2 at 32 px
    sizes = []

    def pack(t):
        if revify._mode.current_step.get() == stage.name and t.dtype == torch.uint8:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(2, 3, 32, 32))
    assert sizes == [2 * 1024 * 2 * 2 * bits // 8] * 4


def test_schedule_moves_every_stage_and_keeps_exact_beta_valid():
    model = revify.convert(timm_model("resnet50"), torch.zeros(2, 3, 32, 32), **FAITHFUL)
    schedule = revify.Schedule(model, steps=4, warmup=1)
    seen = [(st.alpha, st.beta) for st in revify.stages(model)]
    assert set(seen) == {(15 / 16, 1 / 16)}
    path = [schedule.step() for _ in range(6)]
    assert path[0] == (15 / 16, 1 / 16)  # warm-up step, from the converted coefficients
    assert path[-1] == (0.0, 1.0)
    alphas = [a for a, _ in path]
    assert alphas == sorted(alphas, reverse=True)
    for st in revify.stages(model):
        assert (st.alpha, st.beta) == (0.0, 1.0)
        assert 1 / st.beta == round(1 / st.beta)
    with pytest.raises(ValueError, match="no reversible stage"):
        revify.Schedule(timm_model("resnet18"), steps=3)


def test_coefficients_of_the_forward_are_used_in_backward():
    """A schedule step between forward and backward must not corrupt the gradients."""
    model = timm_model("resnet18").double()
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64), **FAITHFUL)
    model.train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    _, ref = step_grads(model, x, plain=True)
    schedule = revify.Schedule(model, steps=1)
    params = list(model.parameters())
    torch.manual_seed(1)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    schedule.step()  # now alpha=0, beta=1 on every stage
    w = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).view_as(y)
    grads = torch.autograd.grad((y * w).sum(), [*params, xg])
    assert max_rel_err(grads, ref) <= 1e-10


def test_exact_beta_one_stores_no_remainders():
    model = timm_model("resnet50")
    revify.convert(model, torch.zeros(2, 3, 32, 32), alpha=0.0, beta=1.0, exact=True)
    stored = []

    def pack(t):
        if t.dtype == torch.uint8:
            stored.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(2, 3, 32, 32))
    assert stored == []


@pytest.mark.parametrize("coeffs", [dict(alpha=63 / 64, beta=1 / 64), dict(alpha=0.0, beta=1.0)])
def test_exact_bf16_autocast(coeffs):
    """Under bf16 autocast the units subtract their rounded input (``m = h``) on the grid too:
    the streams rebuild exactly and the gradient error is plain autograd's."""
    model = timm_model("resnet18", drop_path_rate=0.2)
    revify.convert(model, torch.zeros(2, 3, 32, 32), exact=True, **coeffs)
    model.train()
    report = revify.check(model, torch.randn(4, 3, 32, 32), autocast=torch.bfloat16)
    assert report.plain_grad_error > 0
    assert report.ratio <= 2.0, str(report)
    assert all(st.reconstruction_error == 0 for st in report.stages), str(report)


class _Bottleneck(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        mid = width // 4
        self.f = torch.nn.Sequential(
            torch.nn.Conv2d(width, mid, 1, bias=False), torch.nn.BatchNorm2d(mid),
            torch.nn.ReLU(), torch.nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(mid), torch.nn.ReLU(),
            torch.nn.Conv2d(mid, width, 1, bias=False), torch.nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.f(x))


@pytest.mark.parametrize("coeffs", [dict(alpha=0.0, beta=1.0), dict(alpha=0.0, beta=0.5)])
def test_exact_streams_cost_no_more_peak_memory(coeffs, monkeypatch):
    """Exact steps round and divide in memory the float steps would use anyway, and their
    temporaries are a slice of a state (NOTE [ Stream slices ]; one row here): the simulated
    step peak (``revify.audit``) of a bottleneck stage is the default's plus the remainders
    and a slice. Forming ``x_{k+1} - parts`` out of place, dividing by d = 1, and unsliced
    temporaries each once cost a full state more."""
    width, side, batch = 64, 32, 4
    state = batch * width * side * side * 4
    monkeypatch.setattr(revify._exact, "_SLICE", 4096)  # below a row: one row per slice
    x = torch.zeros(batch, 3, side, side)
    peaks = []
    for exact in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1),
                                    *(_Bottleneck(width) for _ in range(4)),
                                    torch.nn.AdaptiveAvgPool2d(1))
        revify.convert(model, torch.zeros(2, 3, side, side), exact=exact, **coeffs)
        peaks.append(revify.audit(model, x).step_peak_after)
    # what exact mode stores more: the remainders of x_{k-1} / d, 4 bits each, for units 1..3
    remainders = 0 if coeffs["beta"] == 1 else 3 * state // 8
    assert peaks[1] <= peaks[0] + remainders + state // 4, [p / state for p in peaks]


@pytest.mark.parametrize("beta", [1 / 64, 1 / 3, 1.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_exact_sliced_streams_are_exact(beta, channels_last, monkeypatch):
    """Streams cut into slices (NOTE [ Stream slices ]; a few rows each here), in either memory
    layout, with power-of-two, other and unit d: the input is rebuilt bit for bit and float64
    gradients equal plain autograd's."""
    monkeypatch.setattr(revify._exact, "_SLICE", 3 * 64 * 8 * 8)  # three rows of layer1
    model = timm_model("resnet34", drop_path_rate=0.2).double()  # stages of 3, 3, 5, 2 units
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64), alpha=1 - beta,
                   beta=beta, exact=True)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    model.train()
    y_ref, g_ref = step_grads(model, x, plain=True)
    y_rev, g_rev = step_grads(model, x, plain=False)
    assert torch.equal(y_ref, y_rev)
    assert max_rel_err(g_rev, g_ref) <= 1e-10
    assert [len(st.units) for st in revify.stages(model)] == [3, 3, 5, 2]
    for st in revify.stages(model):
        assert st.last_reconstruction_error == 0
