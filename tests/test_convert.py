"""The graph pass: what it finds on the ResNet family, what it keeps, how it fails."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import timm
import torch
import torchvision
from conftest import InlineNet, max_rel_err, step_grads, timm_model
from torch import nn

import revify
from revify import ConversionError

EXAMPLE = torch.zeros(2, 3, 32, 32)

# Identity units per stage: ResNet-50-like [3, 4, 6, 3] blocks minus each first (projection).
FAMILY = {
    "resnet18": [2, 1, 1, 1],
    "resnet34": [3, 3, 5, 2],
    "resnet50": [2, 3, 5, 2],
    "resnet101": [2, 3, 22, 2],
    "resnet152": [2, 7, 35, 2],
    "resnext50_32x4d": [2, 3, 5, 2],
    "seresnet50": [2, 3, 5, 2],
    "resnet50d": [2, 3, 5, 2],
    "wide_resnet50_2": [2, 3, 5, 2],
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in ("resnet101", "wide_resnet50_2") else n
        for n in FAMILY
    ],
)
def test_resnet_family_stages(name):
    model = timm_model(name)
    revify.convert(model, EXAMPLE)
    assert [len(st.units) for st in revify.stages(model)] == FAMILY[name]
    plan = model._revify_plan
    # Every identity residual is converted; every projection shortcut is checkpointed.
    kinds = {(line.kind, line.detail.split(" (")[0]) for line in plan.report}
    assert ("unchanged", "identity residual outside any chain of >= 1 units") not in kinds
    segments = {seg.name: seg.checkpoint for seg in plan.segments}
    assert segments["stem"] is True
    assert sum(segments.values()) == 4  # stem (+ layer1.0) and three transitions
    if name in ("resnext50_32x4d", "seresnet50", "resnet50d"):  # other block internals
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_resnet18_stem_includes_first_transition_when_layer1_has_only_identity_units():
    model = revify.convert(timm_model("resnet18"), EXAMPLE)
    stem = model._revify_plan.segments[0]
    assert stem.calls == ["conv1", "bn1", "act1", "maxpool"]
    assert [u.name for u in revify.stages(model)[0].units] == ["layer1.0", "layer1.1"]


def test_torchvision_resnet50():
    model = torchvision.models.resnet50()
    revify.convert(model, EXAMPLE)
    assert [len(st.units) for st in revify.stages(model)] == [2, 3, 5, 2]
    assert model.__dict__["forward"] is not None  # torchvision has no forward_features


def test_inline_model_units():
    model = revify.convert(InlineNet(), torch.zeros(2, 3, 16, 16))
    (stage,) = revify.stages(model)
    kinds = [type(u).__name__ for u in stage.units]
    assert kinds == ["_BranchUnit", "_GraphUnit", "_GraphUnit"]


def test_single_unit_stages_compute_the_original_function():
    """A stage of one unit is x + R(x) exactly: resnet18's layers 2-4 must match the original."""
    model = timm_model("resnet18").eval()
    original = copy.deepcopy(model)
    revify.convert(model, EXAMPLE)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))
        torch.testing.assert_close(model.layer4(model.layer3(model.layer2(h))),
                                   original.layer4(original.layer3(original.layer2(h))))


def test_parameters_state_dict_and_optimizer_kept():
    model = timm_model("resnet50")
    before = {k: id(p) for k, p in model.named_parameters()}
    keys = list(model.state_dict())
    original_sd = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    revify.convert(model, EXAMPLE)
    assert {k: id(p) for k, p in model.named_parameters()} == before
    assert list(model.state_dict()) == keys
    model.load_state_dict(original_sd, strict=True)
    plain = timm_model("resnet50")
    plain.load_state_dict(model.state_dict(), strict=True)
    w = model.fc.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(model.fc.weight, w)
    assert not torch.equal(model.conv1.weight, original_sd["conv1.weight"])


def test_timm_entry_points_stay_consistent():
    model = timm_model("resnet50").eval()
    revify.convert(model, EXAMPLE)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))
    assert model.num_classes == 1000 and model.pretrained_cfg


def test_convert_twice_warns_and_is_noop():
    model = revify.convert(timm_model("resnet18"), EXAMPLE)
    plan = model._revify_plan
    with pytest.warns(UserWarning, match="already converted"):
        assert revify.convert(model, EXAMPLE) is model
    assert model._revify_plan is plan


def test_revert_restores_original_function():
    model = timm_model("resnet50").eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    revify.convert(model, EXAMPLE)
    with torch.no_grad():
        assert not torch.allclose(model(x), original(x))
        revify.revert(model)
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    assert revify.stages(model) == []


def test_deepcopy_and_torch_save_roundtrip():
    model = revify.convert(timm_model("resnet18"), EXAMPLE).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        clone = copy.deepcopy(model)
        torch.testing.assert_close(clone(x), y)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        torch.testing.assert_close(loaded(x), y)
    assert len(revify.stages(loaded)) == 4
    # The copy's stages drive the copy's modules, not the original's.
    unit = revify.stages(clone)[0].units[0]
    assert unit.module is clone.layer1[0]


# ----------------------------------------------------------------------------------------------
# Bad input


def test_model_without_residuals_returned_unchanged_with_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.randn(1, 3, 16, 16)
    y = model(x)
    with pytest.warns(UserWarning, match="no chain of identity residual units"):
        out = revify.convert(model, x)
    assert out is model and "_revify_plan" not in model.__dict__
    torch.testing.assert_close(model(x), y)
    with pytest.raises(ConversionError, match="no chain"):
        revify.convert(model, x, strict=True)


def test_projection_only_model_says_why():
    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.warns(UserWarning, match="no identity side"):
        revify.convert(Proj(), torch.zeros(1, 3, 8, 8))


class _SideBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x, scale=None):
        return x + torch.tanh(self.f(x)) * scale


class _SideNet(nn.Module):
    """Blocks called with a second tensor, as EVA-02 passes ``rope=`` to each block."""

    def __init__(self, side: str = "attribute"):
        super().__init__()
        self.side = side
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.blocks = nn.ModuleList(_SideBlock() for _ in range(2))

    def forward(self, x):
        mean = x.mean()
        for i, block in enumerate(self.blocks):
            if self.side == "attribute":  # the parameter itself
                scale = self.w
            elif self.side == "computed":  # computed from the parameter before the block
                scale = self.w * (i + 2)
            else:  # computed from the trunk's input: not a function of the block's input
                scale = mean * self.w
            x = block(x, scale=scale)
        return x


@pytest.mark.parametrize("side", ["attribute", "computed"])
def test_side_input_gets_its_gradient(side):
    # Both units read a tensor besides their input: the parameter w itself, or a value computed
    # from it before the block (recomputed inside the unit). w's gradient must come out of the
    # stage backward.
    torch.manual_seed(0)
    model = _SideNet(side).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    revify.convert(model, x)
    (stage,) = revify.stages(model)
    assert len(stage.units) == 2
    y_ref, g_ref = step_grads(model, x, plain=True)
    y_rev, g_rev = step_grads(model, x, plain=False)
    torch.testing.assert_close(y_rev, y_ref, rtol=1e-12, atol=0)
    assert g_rev[0] is not None and g_rev[0].abs().sum() > 0  # w
    assert max_rel_err(g_rev, g_ref) < 1e-10


def test_side_input_computed_from_the_input_is_refused():
    # mean(x) is read by both blocks and is not a function of the second block's input.
    with pytest.warns(UserWarning, match=r"blocks\.0: not a residual: .*reads another input"):
        revify.convert(_SideNet("input"), torch.zeros(2, 8))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            x = x + self.f(x)
        return x


def test_untraceable_model_names_module_and_reason():
    model = DataDependent()
    with pytest.warns(UserWarning, match=r"cannot trace DataDependent\.forward"):
        assert revify.convert(model, torch.zeros(1, 3, 8, 8)) is model
    assert not revify.stages(model)
    with pytest.raises(ConversionError, match=r"cannot trace DataDependent\.forward"):
        revify.convert(model, torch.zeros(1, 3, 8, 8), strict=True)


class Gated(nn.Module):
    """Data-dependent control flow around a traceable backbone."""

    def __init__(self):
        super().__init__()
        self.backbone = timm_model("resnet18", drop_path_rate=0.2)

    def forward(self, x):
        if x.mean() > 100:
            x = x / 2
        return self.backbone(x)


def test_submodule_fallback_converts_traceable_children():
    model = Gated().double()
    with pytest.warns(UserWarning, match="converted traceable submodules instead: backbone"):
        revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    assert [len(st.units) for st in revify.stages(model)] == [2, 1, 1, 1]
    model.train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    _, ref = step_grads(model, x, plain=True)
    _, rev = step_grads(model, x, plain=False)
    assert max_rel_err(rev, ref) < 1e-10
    with pytest.warns(UserWarning, match="already converted"):
        revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    revify.revert(model)
    assert not revify.stages(model)


def test_training_dependent_trunk_is_refused():
    class ModeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            if self.training:
                x = x * 2
            return x + self.f(x)

    with pytest.warns(UserWarning, match="train and eval"):
        revify.convert(ModeDependent(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConversionError, match="train and eval"):
        revify.convert(ModeDependent(), torch.zeros(1, 3, 8, 8), strict=True)


def test_integer_example_input_rejected():
    with pytest.raises(TypeError, match="floating point"):
        revify.convert(timm_model("resnet18"), torch.zeros(1, 3, 32, 32, dtype=torch.long))


def test_wrong_example_shape_explains():
    with pytest.raises(ConversionError, match="example_input"):
        revify.convert(timm_model("resnet18"), torch.zeros(1, 5, 32, 32))


def test_non_module_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        revify.convert(lambda x: x)


def test_check_rejects_bad_input():
    model = revify.convert(timm_model("resnet18"), EXAMPLE)
    with pytest.raises(TypeError, match="revify.check"):
        revify.check(model, torch.zeros(2, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="revify.check"):
        revify.check(model, [1, 2, 3])
    with pytest.raises(ValueError, match="not converted"):
        revify.check(timm_model("resnet18"), torch.zeros(2, 3, 32, 32))


def test_stage_rejects_zero_beta():
    model = revify.convert(timm_model("resnet18"), EXAMPLE)
    with pytest.raises(ValueError, match="beta=0"):
        revify.stages(model)[0].beta = 0


def test_no_warning_on_normal_conversion():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revify.convert(timm.create_model("resnet18"), EXAMPLE)


def test_forward_intermediates_runs_the_converted_stages():
    model = timm_model("resnet50").eval()
    revify.convert(model, EXAMPLE)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        last = model.forward_intermediates(x, intermediates_only=True)[-1]
        direct = model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x))))))
    torch.testing.assert_close(last, feats, rtol=0, atol=0)
    assert revify.stages(model)[1].units[0].module is model.layer2[1]
    assert direct.shape == (2, 512, 4, 4)


def test_set_grad_checkpointing_after_conversion_is_ignored_with_warning():
    model = timm_model("resnet18")
    model.set_grad_checkpointing(True)
    revify.convert(model, EXAMPLE)
    assert model.grad_checkpointing is False
    with pytest.warns(UserWarning, match="ignored on a converted model"):
        model.set_grad_checkpointing(True)
    assert model.grad_checkpointing is False
    revify.revert(model)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing is True


def test_unit_patterns_are_reported():
    resnet = revify.convert(timm_model("resnet50"), EXAMPLE)
    assert {u.pattern for st in revify.stages(resnet) for u in st.units} == {
        "act(x + F(x)) block (ResNet v1)"
    }
    inline = revify.convert(InlineNet(), torch.zeros(2, 3, 16, 16))
    assert [u.pattern for u in revify.stages(inline)[0].units] == [
        "inline x + f(x)", "inline x + F(x)", "inline act(x + F(x))"
    ]
    rows = revify.audit(resnet, (3, 32, 32), batch_size=2).rows
    assert any(r.name == "layer2.1" and r.pattern == "act(x + F(x)) block (ResNet v1)"
               for r in rows)


def test_convert_changes_no_buffer():
    """Tracing runs Python code of timm's BatchNormAct2d on real buffers: none may change."""
    model = timm.create_model("regnetx_002").train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    revify.convert(model, EXAMPLE)
    after = dict(model.named_buffers())
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_dead_end_checks_inside_a_branch_are_absorbed():
    """skresnet18's attention asserts on shapes (a dead-end chain): still an identity unit."""
    model = timm.create_model("skresnet18")
    revify.convert(model, EXAMPLE)
    assert [len(st.units) for st in revify.stages(model)] == [2, 1, 1, 1]


def test_keyword_example_input():
    """``example_input`` may name the trunk's inputs (the Hugging Face style, ``dict(x=...)``)."""
    net = InlineNet()
    revify.convert(net, example_input={"x": torch.randn(2, 3, 16, 16)})
    assert revify.stages(net)
    with pytest.raises(revify.ConversionError, match=r"takes the inputs \(x\).*gave \(pixels\)"):
        revify.convert(InlineNet(), example_input={"pixels": torch.randn(2, 3, 16, 16)})
