"""revify's backward against ordinary autograd of the same converted function.

Float64, BatchNorm in train mode, non-zero residual branches (``zero_init_last=False``),
DropPath/Dropout active: any error in reconstruction, RNG replay or gradient bookkeeping shows
up far above 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from conftest import InlineNet, ReluBlock, max_rel_err, step_grads, timm_model

import revify


def _compare(model, x, tol=1e-10):
    model.train()
    y_ref, g_ref = step_grads(model, x, plain=True)
    y_rev, g_rev = step_grads(model, x, plain=False)
    assert torch.equal(y_ref, y_rev)
    assert max_rel_err(g_rev, g_ref) <= tol
    # The check is not vacuous: gradients are non-trivial and every stage ran reversibly.
    assert all(g is not None for g in g_rev)
    for st in revify.stages(model):
        assert st.last_reconstruction_error is not None
        assert float(st.last_reconstruction_error) < 1e-10


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet152"])
def test_timm_resnet_float64_matches_autograd(name):
    """32 px, batch 4: ResNet-152's 35-unit stage included."""
    model = timm_model(name, drop_path_rate=0.5).double()
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    _compare(model, x)


def test_torchvision_resnet_float64():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().double()
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    _compare(model, torch.randn(4, 3, 32, 32, dtype=torch.float64))


def test_torchvision_regnet_float64():
    # RegNet names its blocks "block1-0": the generated direct-call code used module paths as
    # Python names, and convert failed with a SyntaxError naming nothing.
    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf(num_classes=3).double()
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    assert any("-" in u.name for st in revify.stages(model) for u in st.units)
    _compare(model, torch.randn(4, 3, 32, 32, dtype=torch.float64))


def test_inline_residuals_shared_module_and_dropout():
    torch.manual_seed(0)
    model = InlineNet().double()
    revify.convert(model, torch.zeros(2, 3, 16, 16, dtype=torch.float64))
    (stage,) = revify.stages(model)
    assert len(stage.units) == 3
    _compare(model, torch.randn(4, 3, 16, 16, dtype=torch.float64))


@pytest.mark.parametrize("alpha, beta", [(0.5, 1.0), (0.0, 0.5), (0.3, 0.8)])
def test_general_coefficients(alpha, beta):
    model = timm_model("resnet18", drop_path_rate=0.3).double()
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64), alpha=alpha, beta=beta)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    _compare(model, x, tol=1e-9)


def test_different_coefficients_change_the_function():
    """alpha/beta really reach the recurrence (guards against a silently ignored option)."""
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for alpha, beta in [(0.0, 1.0), (0.5, 1.0)]:
        model = timm_model("resnet18").eval()
        revify.convert(model, torch.zeros(2, 3, 32, 32), alpha=alpha, beta=beta)
        with torch.no_grad():
            outs.append(model(x))
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_error_ratio_against_float64(autocast):
    """fp32 and bf16 autocast: revify's gradient error is that of plain autograd (ratio <= 2)."""
    model = timm_model("resnet50", drop_path_rate=0.2)
    revify.convert(model, torch.zeros(2, 3, 32, 32))
    model.train()
    report = revify.check(model, torch.randn(4, 3, 32, 32), autocast=autocast)
    assert report.plain_grad_error > 0
    assert report.ratio <= 2.0, str(report)
    for st in report.stages:
        assert st.ratio <= 2.0, str(report)
        assert st.reconstruction_error < 1e-3, str(report)


def test_check_of_a_float64_model_reports_no_ratio():
    """In float64 ordinary autograd is the truth itself (error 0): the ratio is undefined, not
    the infinity that read as an alarm; the gradient errors are what to read."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).double()
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    report = revify.check(model.train(), torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert report.plain_grad_error == 0 and 0 < report.grad_error < 1e-12
    assert math.isnan(report.ratio)
    assert all(math.isnan(s.ratio) or s.grad_error == s.plain_grad_error == 0
               for s in report.stages)
    assert "inf" not in str(report) and "ratio n/a" in str(report)


def test_bf16_autocast_deep_stage_reconstructs():
    """Under bf16 autocast a unit sees its input rounded to bf16 and its ``- id`` takes that
    rounded input, so fp32 rounding errors of a rebuilt state do not propagate through the
    stage. Subtracting the fp32 state instead let them grow with depth (0.04 here, 0.6 on
    ResNet-152's 35-unit stage)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                *(ReluBlock(8) for _ in range(36)))
    with torch.no_grad():  # branches of ~1/5 of their input: a well-conditioned inverse
        for block in model[1:]:
            block.conv.weight.mul_(0.2)
    revify.convert(model, torch.zeros(2, 3, 16, 16))
    (stage,) = revify.stages(model)
    assert len(stage.units) == 36
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 16, 16))
    y.float().square().mean().backward()
    assert float(stage.last_reconstruction_error) < 1e-4


def test_replaced_parameters_get_the_gradients():
    """Parameters swapped after conversion (``load_state_dict(assign=True)``) are the ones read
    and differentiated, in checkpointed segments and inline units alike."""
    torch.manual_seed(0)
    model = InlineNet().double()
    revify.convert(model, torch.zeros(2, 3, 16, 16, dtype=torch.float64))
    fresh = {k: torch.randn_like(v) for k, v in model.state_dict().items()
             if v.is_floating_point()}
    model.load_state_dict(fresh, strict=False, assign=True)
    assert model.stem.weight is not None and torch.equal(model.stem.weight, fresh["stem.weight"])
    _compare(model, torch.randn(4, 3, 16, 16, dtype=torch.float64))


def test_functional_call_parameters_refused_in_backward():
    """``torch.func.functional_call`` swaps parameters back before backward, when the recompute
    runs: revify refuses instead of recomputing with other weights."""
    model = timm_model("resnet18")
    revify.convert(model, torch.zeros(2, 3, 32, 32))
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    y = torch.func.functional_call(model, params, (torch.randn(2, 3, 32, 32),))
    with pytest.raises(RuntimeError, match="functional_call"):
        y.sum().backward()


@pytest.mark.parametrize("alpha, beta", [(0.0, 1.0), (0.5, 1.0), (0.25, 0.75)])
def test_bf16_unit0_reconstruction_error_is_measured(alpha, beta):
    """Under bf16 autocast unit 0 folds ``x_1`` and ``x_0`` before its recompute; the error it
    reports is still ``max|x_{-1} - x_0| / max|x_0|``: tiny for an invertible stage, as is the
    unfolded measure against the true input that revify.check takes. A fold that drops
    ``alpha`` reports about ``alpha``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                *(ReluBlock(8) for _ in range(4)))
    with torch.no_grad():
        for block in model[1:]:
            block.conv.weight.mul_(0.2)
    revify.convert(model, torch.zeros(2, 3, 16, 16), alpha=alpha, beta=beta)
    (stage,) = revify.stages(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    folded = float(stage.last_reconstruction_error)
    assert 0 <= folded < 1e-4
    stage.record_input = True  # what revify.check does: the unfolded measure, against x_0
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
    finally:
        stage.record_input = False
    assert float(stage.last_reconstruction_error) < 1e-4
