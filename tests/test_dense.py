"""Dense-task backbones: torchvision's detection models convert their backbone and train."""

from __future__ import annotations

import warnings

import torch
from conftest import max_rel_err

import revify

tv = __import__("pytest").importorskip("torchvision")


def _detector(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    build = getattr(tv.models.detection, name)
    model = build(weights=None, weights_backbone=None, min_size=64, max_size=64).double().train()
    with torch.no_grad():  # non-trivial residual branches (torchvision zero-inits none, but
        for p in model.backbone.parameters():  # a random init is far from a trained one)
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _loss_and_grads(model, images, targets, plain: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the RPN's and ROI heads' box sampling
    if plain:
        with revify.plain_autograd():
            losses = model(images, targets)
    else:
        losses = model(images, targets)
    loss = sum(losses.values())
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None
                           for p in model.parameters()]


def test_faster_rcnn_backbone_converts_and_trains_with_true_gradients():
    model = _detector("fasterrcnn_resnet50_fpn")
    images = [torch.rand(3, 64, 64, dtype=torch.float64) for _ in range(2)]
    targets = [dict(boxes=torch.tensor([[8.0, 10.0, 40.0, 50.0]], dtype=torch.float64),
                    labels=torch.tensor([1])) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the detector is not traceable: its backbone is
        revify.convert(model)
    assert [len(st.units) for st in revify.stages(model)] == [2, 3, 5, 2]
    loss_ref, ref = _loss_and_grads(model, images, targets, plain=True)
    loss, got = _loss_and_grads(model, images, targets, plain=False)
    assert torch.allclose(loss, loss_ref, rtol=1e-12)
    assert all((a is None) == (b is None) for a, b in zip(got, ref, strict=True))
    pairs = [(a, b) for a, b in zip(got, ref, strict=True) if a is not None]
    assert max_rel_err([a for a, _ in pairs], [b for _, b in pairs]) < 1e-10
    assert all(st.last_reconstruction_error is not None for st in revify.stages(model))


def test_detection_backbone_saves_most_of_its_activations():
    # Deterministic counts on fake tensors (the audit): bytes saved for backward by the
    # backbone with FPN, converted against unconverted.
    model = tv.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    report = revify.audit(model.backbone, (3, 256, 256), batch_size=1)
    print(f"saved for backward: {report.saved_after / report.saved_before:.2f}x unconverted")
    assert report.saved_after <= 0.5 * report.saved_before
