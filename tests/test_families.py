"""One float64 gradient check per timm family, with the stage layout computed from the architecture.

Each test builds a small model with non-zero residual branches (``zero_init_last=False``, layer
scale well away from 0, or gains re-randomised: DESIGN.md §3), converts it, and checks that

- every identity residual ``plan.report`` lists is ``"reversible"``;
- the reversible stages have the number of units counted by hand from the architecture (the
  comment above each expected list gives the count);
- revify's float64 gradients (every parameter and the input, BatchNorm in train mode, DropPath
  active where the model has it) equal those of the same converted model under
  ``revify.plain_autograd()`` to 1e-10, and the outputs are identical;
- the check is not vacuous: the residual branches are far from zero (``||R(h)|| / ||h||``).

CNNs run at 32 or 64 px (64 where a last stage at 1x1 with batch 2 would make train-mode
BatchNorm too ill-conditioned for 1e-10), batch 2; transformers are built small.
"""

from __future__ import annotations

import statistics
import warnings

import pytest
import timm
import torch
from conftest import max_rel_err, step_grads, timm_model
from timm.models.eva import Eva
from timm.models.mlp_mixer import MlpMixer
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import revify
from revify.check import _branch_ratios

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small float64 models on a shared 2-core machine: one intra-op thread was ~5x faster
    than two busy ones (threads waiting on each other), and it leaves a core to others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_family(model: nn.Module, size: int, units: list[int], tol: float = 1e-10) -> None:
    """Convert ``model`` (float64, train mode) and run every check of the module docstring."""
    model = model.double().train()
    revify.convert(model, torch.zeros(2, 3, size, size, dtype=F64))
    stages = revify.stages(model)
    assert [len(st.units) for st in stages] == units

    report = model._revify_plan.report
    identity = [r for r in report if r.detail.startswith("identity residual")]
    assert identity, "the report lists no identity residual"
    assert [r for r in identity if r.kind != "reversible"] == []

    x = torch.randn(2, 3, size, size, dtype=F64, generator=_gen(1))
    # Branches in eval mode: DropPath (rate up to 0.5 here) may drop a whole batch of 2.
    state = {k: v.clone() for k, v in model.named_buffers()}
    model.eval()
    with torch.no_grad(), _branch_ratios(model) as ratios:
        model(x)
    model.train()
    assert len(ratios) == sum(units)
    assert statistics.median(ratios) > 1e-2, ratios
    assert all(v.equal(state[k]) for k, v in model.named_buffers())

    y_ref, g_ref = step_grads(model, x, plain=True)
    y_rev, g_rev = step_grads(model, x, plain=False)
    assert torch.equal(y_ref, y_rev)
    assert all(g is not None for g in g_rev)
    assert max_rel_err(g_rev, g_ref) <= tol
    for st in stages:
        assert float(st.last_reconstruction_error) < 1e-10


def _rerandomise_gains(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Set parameters whose name ends with one of ``names`` to U(0.5, 1.5)."""
    gen = _gen(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in names:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


# ----------------------------------------------------------------------------------------------
# CNN families


def test_resnet_v1_basic_blocks():
    # resnet34: BasicBlocks [3, 4, 6, 3]; layer1 keeps 64 channels at stride 1, so all 3 of its
    # blocks are identity; layers 2-4 open with a strided projection block.
    model = timm_model("resnet34", drop_path_rate=0.2)
    _check_family(model, 32, [3, 3, 5, 2])
    assert [st.name for st in revify.stages(model)] == ["layer1", "layer2", "layer3", "layer4"]


def test_resnetv2_preact():
    # resnetv2_50 cut to [3, 3, 2, 2] pre-activation bottlenecks (timm lets ``layers``
    # override): 64 -> 256 channels in stage 0 and stride 2 after, so every stage's first block
    # has a projection shortcut.
    model = timm_model("resnetv2_50", layers=[3, 3, 2, 2], drop_path_rate=0.2)
    _check_family(model, 32, [2, 2, 1, 1])


def test_nf_resnet_normfree_leaf_blocks():
    # nf_resnet26: NormFreeBlocks [2, 2, 2, 2], 256/512/1024/2048 channels: one identity block
    # per stage, each inside a timm notrace leaf. conv3's ScaledStdConv gain starts at 0
    # (branch = 0): re-randomised.
    model = _rerandomise_gains(timm.create_model("nf_resnet26", drop_path_rate=0.2), ("gain",))
    _check_family(model, 32, [1, 1, 1, 1])
    assert [r.name for r in model._revify_plan.report if r.kind == "reversible"] == [
        f"stages.{i}.1" for i in range(4)
    ]


def test_regnety():
    # regnety_002 (RegNetY-200MF): depths [1, 1, 4, 7]; each stage opens with a stride-2
    # projection block, so s1 and s2 hold no identity unit. 64 px: s4 is 2x2, not 1x1.
    model = timm_model("regnety_002", drop_path_rate=0.2)
    _check_family(model, 64, [3, 6])
    assert [st.name for st in revify.stages(model)] == ["s3", "s4"]


@pytest.mark.parametrize(
    "name, units",
    [
        # ds(s1, 32->16) | ir s2, ir | ir s2, ir | ir s2, ir, ir | ir 80->112, ir, ir | ir s2, 3 ir
        # | ir 192->320: the first block of every stage changes stride or width.
        pytest.param("efficientnet_b0", [1, 1, 2, 2, 3], marks=pytest.mark.slow),
        # ds s2 | ir s2, ir | ir s2, 2 ir | ir 40->48, ir | ir s2, 2 ir | conv
        ("mobilenetv3_small_100", [1, 2, 1, 2]),
    ],
)
def test_efficientnet_mobilenet_inverted_residuals(name, units):
    model = timm.create_model(name, drop_path_rate=0.2)  # BN weights 1: branches are non-zero
    _check_family(model, 64, units)


def test_ghostnet():
    # GhostNet cfgs (k, exp, c, se, s): 16->16 s1 | s2 | 24 s1 | s2 | 40 s1 | s2 |
    # 80, 80, 80 s1, 80->112, 112 s1 | s2 | 4x 160 s1. Identity blocks: 1, 1, 1, 3 + 1, 4;
    # the 80->112 block splits stage 6 in two.
    _check_family(timm.create_model("ghostnet_100"), 64, [1, 1, 1, 3, 1, 4])


def test_cspresnet_cross_stage_blocks():
    # cspresnet50: depths (3, 3, 5, 2); each CrossStage splits its expanded input in two and runs
    # its blocks on one half at constant width, so every block is identity.
    _check_family(timm_model("cspresnet50", drop_path_rate=0.2), 32, [3, 3, 5, 2])


def test_res2net_nested_adds():
    # res2net50_26w_4s cut to [3, 3, 2, 2] Bottle2necks, projection first blocks. The
    # hierarchical adds inside a block (sp + spx[i]) are not identity residuals of its input.
    model = timm_model("res2net50_26w_4s", layers=[3, 3, 2, 2], drop_path_rate=0.2)
    _check_family(model, 32, [2, 2, 1, 1])


def test_dla_shared_branch_points():
    # dla34: trees level2 (1 level), level3, level4 (2 levels), level5 (1 level). Identity
    # DlaBasic blocks: tree2 of each 1-level tree (4 of them) and tree1 of the stride-1
    # sub-trees of level3/level4 (2). Every block output also feeds a Root concat: where one
    # block feeds the next as well, the two are one chain that hands the first one's output
    # to the concat (NOTE [ Taps ] in revify/coupling.py).
    _check_family(timm.create_model("dla34"), 64, [1, 1, 2, 1, 2, 1])


class _Intermediates(nn.Module):
    """``forward_intermediates`` as a forward: its feature maps, flattened and joined."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.model.forward_intermediates(x, intermediates_only=True)
        return torch.cat([m.flatten(1) for m in maps], 1)


class _Levels(nn.Module):
    """DLA's levels called one by one from outside the converted trunk."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, maps = self.model, []
        x = m.base_layer(x)
        for i in range(6):
            x = getattr(m, f"level{i}")(x)
            maps.append(x.flatten(1))
        return torch.cat(maps, 1)


def test_dla_trees_called_with_optional_arguments():
    # forward_intermediates calls each level, whose trees call their sub-trees as
    # tree1(x, shortcut) and tree2(x1, None, children): the trees holding stages are planned
    # with those optional arguments as inputs (NOTE [ Optional inputs ] in revify/_trace.py),
    # and a tree holding an inline unit before its own stage shares both trunk stages. They
    # raised "DlaTree.forward takes 1 input(s) (x) but example_input gave 2" (issue 15).
    torch.manual_seed(0)
    model = timm.create_model("dla34", num_classes=4).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=F64, generator=_gen(1))
    revify.convert(model, x)
    for net in (_Intermediates(model), _Levels(model)):  # planned as a method; level by level
        y_ref, g_ref = step_grads(net, x, plain=True)
        y, g = step_grads(net, x, plain=False)
        assert torch.equal(y, y_ref) and max_rel_err(g, g_ref) <= 1e-10
    plan = model.level3.tree2.__dict__["_revify_plan"]
    assert plan.args == ["x", "children"]  # shortcut given at its default, None
    assert all(any(st is t for t in revify.stages(model)) for st in plan.stages)
    with pytest.raises(TypeError, match="traced with children given as list of 2 tensors"):
        model.level3.tree2(y_ref.new_zeros(2, 128, 16, 16), None, None)


class _NotTraceable(nn.Module):
    """Calls a DLA tree as ``tree(x, shortcut)`` after a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.dla import DlaBasic, DlaTree

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.tree = DlaTree(1, DlaBasic, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.sum() > 0:  # torch.fx cannot trace this
            x = x * 1.0
        return self.tree(x, x)


def test_submodule_fallback_with_an_optional_positional_argument():
    torch.manual_seed(0)
    model = _NotTraceable().double().train()
    x = torch.randn(2, 3, 16, 16, dtype=F64, generator=_gen(1))
    with pytest.warns(UserWarning, match="converted traceable submodules instead: tree"):
        revify.convert(model, x)
    assert model.tree.__dict__["_revify_plan"].args == ["x", "shortcut"]
    assert [len(st.units) for st in revify.stages(model)] == [2]  # with a tap
    y_ref, g_ref = step_grads(model, x, plain=True)
    y, g = step_grads(model, x, plain=False)
    assert torch.equal(y, y_ref) and max_rel_err(g, g_ref) <= 1e-10


def test_poolformer_layer_scale():
    # poolformer_s12: MetaFormer depths (2, 2, 6, 2), each block two residuals (pooling token
    # mixer, MLP) with layer scale; downsampling sits between stages. The layer scales start at
    # 1e-5 (fixed by timm's poolformer_s12): re-randomised.
    model = timm.create_model("poolformer_s12", drop_path_rate=0.2)
    _check_family(_rerandomise_gains(model, ("scale",)), 32, [2, 2, 6, 2])


# ----------------------------------------------------------------------------------------------
# ConvNeXt and transformers


def _small_convnext() -> nn.Module:
    return timm.create_model("convnext_atto", ls_init_value=0.5, drop_path_rate=0.5)


def _small_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, **kwargs
    )


def _small_timm_vit() -> nn.Module:
    """The same small ViT through ``timm.create_model`` (which sets ``pretrained_cfg``)."""
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2
    )


def test_convnext_layer_scale():
    # convnext_atto: depths (2, 2, 6, 2); stage downsampling is its own module, so every block
    # is identity. Layer scale 0.5 (timm's 1e-6 would make the branches ~0).
    torch.manual_seed(0)
    model = _small_convnext()
    _check_family(model, 32, [2, 2, 6, 2])
    report = model._revify_plan.report
    assert {r.name for r in report if r.kind == "reversible"} == {
        f"stages.{s}.blocks.{b}" for s, n in enumerate([2, 2, 6, 2]) for b in range(n)
    }


def test_vit_drop_path():
    # 4 blocks, each one unit holding two residuals (attention, MLP): one stage of 4.
    model = _small_vit(drop_path_rate=0.5)
    _check_family(model, 32, [4])
    assert {r.name for r in model._revify_plan.report if r.kind == "reversible"} == {
        f"blocks.{i}" for i in range(4)
    }


def test_eva02_rotary_side_input():
    # EVA-02 blocks take the rotary embedding as rope=: 3 blocks, one stage of 3 whose units
    # read it as a side input.
    torch.manual_seed(0)
    model = Eva(
        img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0,
        swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), drop_path_rate=0.5,
    )
    with torch.no_grad():  # EVA's init scales the output projections down by depth
        for m in model.blocks.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.2, generator=_gen(3))
    _check_family(model, 32, [3])
    (stage,) = revify.stages(model)
    assert all(u.kwargs["rope"].target == "rope.pos_embed" for u in stage.units)


def test_swin_windows_and_shift():
    # depths (2, 2): 16x16 tokens, window 4 (the second block of each stage shifted, with its
    # attention mask); PatchMerging opens stage 2 (layers.1.downsample): two stages of 2.
    torch.manual_seed(0)
    model = SwinTransformer(
        img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
        drop_path_rate=0.5,
    )
    _check_family(model, 64, [2, 2])


def test_mlp_mixer():
    # 4 MixerBlocks (token-mixing and channel-mixing residuals): one stage of 4.
    torch.manual_seed(0)
    model = MlpMixer(img_size=32, patch_size=8, num_blocks=4, embed_dim=64, drop_path_rate=0.5)
    _check_family(model, 32, [4])


# ----------------------------------------------------------------------------------------------
# Nothing to convert, timm API


@pytest.mark.slow  # 133M parameters to build
def test_vgg_has_nothing_to_convert():
    model = timm.create_model("vgg11", num_classes=3)
    with pytest.warns(UserWarning, match="it has no residual adds"):
        out = revify.convert(model, torch.zeros(2, 3, 32, 32))
    assert out is model and revify.stages(model) == []


@pytest.mark.parametrize("build", [_small_timm_vit, _small_convnext], ids=["vit", "convnext"])
def test_timm_api_after_conversion(build):
    model = build().train()
    cfg = dict(model.pretrained_cfg)
    x = torch.randn(2, 3, 32, 32, generator=_gen(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        revify.convert(model, torch.zeros(2, 3, 32, 32))
    assert [str(w.message) for w in caught if "revify" in str(w.message)] == []
    assert revify.stages(model)
    assert model.pretrained_cfg == cfg
    assert model.num_classes == 1000

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        assert torch.equal(logits, model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)

    model.reset_classifier(5)
    assert model.num_classes == 5
    model.train()
    out = model(x)
    assert out.shape == (2, 5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
