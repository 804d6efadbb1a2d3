"""torch.fx tracing of a converted model (NOTE [ Tracing a converted model ])."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.fx as fx
from conftest import InlineNet, max_rel_err, step_grads, timm_model
from timm.models._features_fx import create_feature_extractor

import revify
from revify import ConversionError


def test_traced_converted_model_runs_its_stages_with_true_gradients():
    model = timm_model("resnet18", num_classes=4, drop_path_rate=0.2).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    revify.convert(model, x)
    traced = fx.symbolic_trace(model)
    calls = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"layer1", "layer2", "layer3", "layer4"} <= calls
    assert not any(t.startswith("layer1.0.") for t in calls)  # stages are one call each
    _, ref = step_grads(model, x, plain=True)
    for st in revify.stages(model):
        st.last_reconstruction_error = None
    out, got = step_grads(traced, x, plain=False)
    assert all(st.last_reconstruction_error is not None for st in revify.stages(model))
    assert max_rel_err(got, ref) < 1e-10
    torch.manual_seed(1)
    assert torch.equal(out, model(x))  # the same function as the converted model


def test_timm_feature_extraction_of_a_converted_model():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=4, ls_init_value=0.5)
    x = torch.randn(2, 3, 32, 32)
    revify.convert(model, x)
    features = create_feature_extractor(model, return_nodes=["stages.1", "stages.3"])
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        got = features(x)
    assert torch.equal(got["stages.1"], want[0]) and torch.equal(got["stages.3"], want[1])


def test_vit_traces_with_its_fixed_arguments_checked_in_the_graph():
    # symbolic_trace makes ViT's attn_mask=None and is_causal=False Proxies, whose
    # `if attn_mask is not None or is_causal` branch loops over the blocks; the converted trunk
    # fixed them at their defaults, so the trace does too and the graph checks them
    # (NOTE [ Fixed arguments under fx ]).
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8,
                            drop_path_rate=0.1).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    revify.convert(vit, x)
    traced = fx.symbolic_trace(vit)
    calls = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "blocks" in calls and not any(t.startswith("blocks.0.") for t in calls)
    assert "forward" not in vit.blocks[0].__dict__  # the guards are gone again
    _, ref = step_grads(vit, x, plain=True)
    _, got = step_grads(traced, x, plain=False)
    assert max_rel_err(got, ref) < 1e-10
    with pytest.raises(AssertionError, match="traced with attn_mask=None"):
        traced(x, attn_mask=torch.zeros(17, 17, dtype=torch.float64))
    with pytest.raises(AssertionError, match="traced with is_causal=False"):
        traced(x, is_causal=True)
    features = create_feature_extractor(vit, return_nodes=["blocks"])  # timm's fx test path
    vit.eval()
    with torch.no_grad():
        want = vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))))
        assert torch.equal(features(x)["blocks"], want)


class _MaskedTrunk(torch.nn.Module):
    """A trunk whose default is not a plain constant: a Proxy for it still takes the branch
    that calls the blocks one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = torch.nn.Sequential(*(Residual(4) for _ in range(3)))

    def forward_features(self, x, masks=(None,)):
        x = self.stem(x)
        if masks[0] is not None:
            for blk in self.blocks:
                x = blk(x) * masks[0]
            return x
        return self.blocks(x)

    def forward(self, x, masks=(None,)):
        return self.forward_features(x, masks).mean((2, 3))


class Residual(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + torch.tanh(self.conv(x))


def test_tracing_that_would_record_the_unconverted_function_is_refused():
    net = _MaskedTrunk()
    revify.convert(net, torch.zeros(2, 3, 16, 16))
    assert revify.stages(net)
    with pytest.raises(ConversionError, match="traced into a Residual of the converted stage"):
        fx.symbolic_trace(net)
    assert "forward" not in net.blocks[0].__dict__  # the guards are gone again
    # fx traces a root's class forward, not the converted one: the units refuse.
    net = InlineNet()
    revify.convert(net, torch.zeros(2, 3, 16, 16))
    with pytest.raises(ConversionError, match="Sequential, a unit of a converted model"):
        fx.symbolic_trace(net)


def test_feature_extraction_calling_nested_stage_holders_has_true_gradients():
    # MobileNetV3's `blocks` holds a stage and calls blocks.1, which holds another: the plan
    # built for `blocks` must not run blocks.1's stage inside a checkpointed segment, whose
    # recompute reads stand-ins for the parameters (a tensor hook makes it use them): the
    # stage's backward refused "parameters are not the ones the forward used" (issue 15;
    # NOTE [ Nested plans ] in revify/_plan.py).
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=4).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    revify.convert(model, x)
    calls = []
    model.blocks[0][0].conv_dw.weight.register_hook(lambda g: calls.append(1))
    features = create_feature_extractor(model, return_nodes=["blocks"])

    class Blocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = features

        def forward(self, x):
            return self.features(x)["blocks"]

    net = Blocks().train()
    _, ref = step_grads(net, x, plain=True)
    assert len(calls) == 1
    _, got = step_grads(net, x, plain=False)
    assert len(calls) == 2  # the hook ran once in each
    assert max_rel_err(got, ref) < 1e-10
    sub = model.blocks.__dict__["_revify_plan"]
    nested = [seg for seg in sub.segments if seg.calls == ["1"]]
    assert len(nested) == 1 and not nested[0].checkpoint
