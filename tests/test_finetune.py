"""Fine-tuning a locally pretrained timm ResNet converted with the faithful coupling.

A small ResNet-34 (stage widths 8-64, reversible chains of 2, 3, 5 and 2 units) is pre-trained
briefly on scikit-learn's digits 0-4, saved, and loaded back the way users load local pretrained
weights (``pretrained_cfg_overlay=dict(file=...)``). Converted with ``alpha=63/64, beta=1/64,
exact=True`` it must still predict what the pretrained model predicts, compute the same float64
gradients as ordinary autograd of the same function, and fine-tune on digits 5-9.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import max_rel_err, step_grads
from torch import Tensor, nn

import revify

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402

ARCH = "resnet34"
CHANNELS = (8, 16, 32, 64)
FAITHFUL = dict(alpha=63 / 64, beta=1 / 64, exact=True)
PRETRAIN_STEPS = 150
SIZE = 32


def _digits() -> dict[str, Tensor]:
    """Digits 0-4 split 3:1 into train/test, digits 5-9 relabelled 0-4; (N, 3, 32, 32) images."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    old = torch.nonzero(y < 5).flatten()
    old = old[torch.randperm(len(old), generator=gen)]
    cut = len(old) * 3 // 4
    new = torch.nonzero(y >= 5).flatten()
    return dict(x_pre=x[old[:cut]], y_pre=y[old[:cut]], x_held=x[old[cut:]], y_held=y[old[cut:]],
                x_new=x[new], y_new=y[new] - 5, blank=x.min())


def _shift(x: Tensor, gen: torch.Generator, blank: Tensor, m: int = 3) -> Tensor:
    """Random whole-pixel shifts of up to ``m`` px (light augmentation)."""
    _, _, h, w = x.shape
    padded = F.pad(x, (m, m, m, m), value=float(blank))
    offsets = torch.randint(0, 2 * m + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, r : r + h, c : c + w] for i, (r, c) in enumerate(offsets)])


@pytest.fixture(scope="module")
def single_thread():
    """Small convolutions on a shared 2-core machine run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> dict[str, Tensor]:
    return _digits()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data, single_thread) -> Path:
    """A ResNet-34 layout pre-trained briefly on digits 0-4, saved as a state_dict file.

    ``zero_init_last=False`` so that the residual branches are live after a short training, as
    they are in real pretrained models (timm's default starts them at zero, DESIGN.md §3).
    """
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=5, channels=CHANNELS, zero_init_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, PRETRAIN_STEPS)
    gen = torch.Generator().manual_seed(0)
    for _ in range(PRETRAIN_STEPS):
        idx = torch.randint(0, len(data["y_pre"]), (64,), generator=gen)
        x = _shift(data["x_pre"][idx], gen, data["blank"])
        loss = F.cross_entropy(model(x), data["y_pre"][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    path = tmp_path_factory.mktemp("pretrained") / "resnet34_digits04.pth"
    torch.save(model.state_dict(), path)
    return path


def _load(path: Path) -> nn.Module:
    """The user's path: a local file as timm pretrained weights, with its 5-class head."""
    return timm.create_model(
        ARCH, pretrained=True, num_classes=5, channels=CHANNELS,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=5),
    )


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return model(x)


def test_overlay_loads_the_local_file_without_network(checkpoint, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("timm tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = _load(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    for name, tensor in saved.items():  # the 5-class head included
        assert torch.equal(loaded[name], tensor), name


def _agreement(checkpoint: Path, x: Tensor, **convert_kwargs) -> tuple[float, float]:
    """Top-1 agreement and relative output error of the converted pretrained model with the
    original on ``x``, from ``revify.check`` (checked against a separately loaded original)."""
    reference = _logits(_load(checkpoint), x)
    model = revify.convert(_load(checkpoint), x[:2], **convert_kwargs)
    report = revify.check(model, x, gradients=False)
    agreement = (_logits(model, x).argmax(1) == reference.argmax(1)).double().mean()
    assert report.top1_agreement == pytest.approx(float(agreement))
    return report.top1_agreement, report.output_rel_error


def test_faithful_conversion_keeps_pretrained_predictions(checkpoint, data):
    x, y = data["x_held"], data["y_held"]
    assert (_logits(_load(checkpoint), x).argmax(1) == y).double().mean() >= 0.9  # it learnt
    faithful, faithful_error = _agreement(checkpoint, x, **FAITHFUL)
    default, default_error = _agreement(checkpoint, x)
    revnet, _ = _agreement(checkpoint, x, coupling="revnet")
    # The coupling changes the function (x_{k+1} = x_k + R_k(x_k) + (x_{k-1} - x_k)/d), so this
    # is not vacuous; RevNet's alpha=0, beta=1 feeds each unit x_{k-1} + R(x_k) instead of
    # x_k + R(x_k) and loses most pretrained predictions, the faithful couplings keep them.
    assert faithful_error > 1e-3
    assert faithful >= 0.9
    assert (default, default_error) == (faithful, faithful_error)  # the default is faithful
    assert revnet < faithful - 0.1


def test_faithful_float64_gradients_match_plain_autograd(checkpoint, data):
    model = revify.convert(_load(checkpoint), data["x_held"][:2], **FAITHFUL).double().train()
    x = data["x_held"][:8].double()
    y_rev, g_rev = step_grads(model, x, plain=False)
    y_plain, g_plain = step_grads(model, x, plain=True)
    assert torch.equal(y_rev, y_plain)
    assert max_rel_err(g_rev, g_plain) <= 1e-10
    for st in revify.stages(model):  # fixed-point streams: the input is rebuilt bit for bit
        assert st.last_reconstruction_error == 0


def test_finetuning_with_schedule_reduces_loss(checkpoint, data):
    model = revify.convert(_load(checkpoint), data["x_held"][:2], **FAITHFUL)
    torch.manual_seed(0)
    model.reset_classifier(5)  # a new head for digits 5-9
    before = copy.deepcopy(model.state_dict())
    schedule = revify.Schedule(model, steps=20, warmup=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    x, y = data["x_new"][:32], data["y_new"][:32]
    model.train()
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        for st in revify.stages(model):  # exact streams, whatever the current beta = 1/d
            assert st.last_reconstruction_error == 0
    assert losses[-1] < 0.5 * losses[0], losses
    alpha, beta = schedule.coefficients()
    assert 0 < alpha < 1 and 1 / 64 < beta < 1  # on its way from (63/64, 1/64) to (0, 1)
    assert all(st.alpha == alpha for st in revify.stages(model))
    # Gradients reached the units inside the reversible stages, not only the new head.
    after = model.state_dict()
    for st in revify.stages(model):
        for unit in st.units:
            name = f"{unit.name}.conv1.weight"
            assert not torch.equal(before[name], after[name]), name
