"""The default conversion keeps a pretrained network's function; ``coupling`` chooses another."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from conftest import timm_model

import revify
from revify.cli import main


def _output_error(model: torch.nn.Module, x: torch.Tensor, **options) -> float:
    model.eval()
    with torch.no_grad():
        ref = model(x)
        revify.convert(model, x[:2], **options)
        out = model(x)
    return float((out - ref).norm() / ref.norm())


def test_default_keeps_the_function_and_revnet_does_not():
    """On weights with live residual branches the default stays within a few percent of the
    original network's output; the RevNet coupling changes it by tens of percent."""
    x = torch.randn(8, 3, 32, 32)
    default = _output_error(timm_model("resnet50"), x)
    revnet = _output_error(timm_model("resnet50"), x, coupling="revnet")
    assert default < 0.05 < 0.2 < revnet, (default, revnet)


def _coefficients(**options) -> set[tuple[float, float, bool]]:
    model = revify.convert(timm_model("resnet18"), torch.zeros(2, 3, 32, 32), **options)
    return {(st.alpha, st.beta, st.exact) for st in revify.stages(model)}


def test_coupling_presets_and_overrides():
    assert _coefficients() == {(63 / 64, 1 / 64, True)}
    assert _coefficients(coupling="revnet") == {(0.0, 1.0, False)}
    assert _coefficients(alpha=15 / 16, beta=1 / 16) == {(15 / 16, 1 / 16, True)}
    assert _coefficients(coupling="revnet", exact=True) == {(0.0, 1.0, True)}
    # exact streams by default only where they are needed and possible: beta = 1/d < 1
    assert _coefficients(alpha=0.3, beta=0.8) == {(0.3, 0.8, False)}


@pytest.mark.parametrize("bad", [dict(coupling="momentum"), dict(alpha=float("nan")),
                                 dict(beta=float("inf")), dict(alpha="0.5")])
def test_bad_coupling_options_are_refused(bad):
    with pytest.raises(ValueError, match="revify.convert"):
        revify.convert(timm_model("resnet18"), torch.zeros(2, 3, 32, 32), **bad)


def test_default_example_has_the_size_the_model_was_built_for():
    """A ViT built for 32 px (its pretrained_cfg still says 224) and a one-channel ResNet
    convert without an example input."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    revify.convert(vit)
    assert revify.stages(vit)
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000)
    gray = timm_model("resnet18", in_chans=1)
    revify.convert(gray)
    assert revify.stages(gray)
    gray(torch.randn(2, 1, 32, 32)).sum().backward()
    tv = torchvision.models.VisionTransformer(  # asserts its input size in forward
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    revify.convert(tv)
    assert revify.stages(tv)
    assert tv(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_default_example_follows_the_model_dtype_and_device():
    model = timm_model("resnet18").double()
    revify.convert(model)  # a float32 example would fail the float64 convolutions
    assert revify.stages(model)
    meta = timm_model("resnet18").to("meta")
    revify.convert(meta)
    assert revify.stages(meta)


def test_audit_says_which_coupling_it_audited(capsys):
    assert main(["audit", "resnet18", "--batch-size", "2", "--img-size", "32", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["options"]["coupling"] == "faithful" and data["options"]["exact"] is True
    assert main(["audit", "resnet18", "--batch-size", "2", "--img-size", "32",
                 "--coupling", "revnet"]) == 0
    assert "coupling revnet" in capsys.readouterr().out
