"""Shared helpers: build small models with non-zero residual branches, compare gradients."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import revify
from revify._replay import own_hook


class InlineNet(nn.Module):
    """Residuals written inline in ``forward`` (no block class), one branch module shared."""

    def __init__(self, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.f1 = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.f2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.f1(x)
        x = x + self.drop(self.bn(self.f2(x)))
        x = torch.relu(x + self.f1(x))
        return self.head(x.mean((2, 3)))


class ReluBlock(nn.Module):
    """``relu(h + conv(h))``: a unit with a post-add activation, used as ``U(h) - h``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(h + self.conv(h))


class CountingBlock(nn.Module):
    """A unit depending on a Python call counter: its recompute computes something else (what
    the mismatch check must report)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + torch.tanh(self.conv(x)) * (1 + self.calls % 2)


def timm_model(name: str, **kwargs) -> nn.Module:
    """A timm model with non-zero residual branches (zero_init_last hides errors)."""
    torch.manual_seed(0)
    kwargs.setdefault("zero_init_last", False)
    return timm.create_model(name, pretrained=False, **kwargs)


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(state[k])


def step_grads(model: nn.Module, x: torch.Tensor, plain: bool, seed: int = 1, scale: float = 1.0):
    """Output and gradients (parameters, then input) of a fixed projection of the output.

    Buffers are restored afterwards and the RNG seeded, so two calls see the same state and
    draw the same dropout masks. ``scale`` multiplies the loss and divides the gradients: the
    same gradients, rounded differently in the backward.
    """
    state = bn_state(model)
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    if plain:
        with revify.plain_autograd():
            y = model(x)
    else:
        y = model(x)
    w = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    grads = torch.autograd.grad((y * w).sum() * scale, [*params, x], allow_unused=True)
    if scale != 1.0:
        grads = tuple(None if g is None else g / scale for g in grads)
    restore(model, state)
    return y.detach(), grads


def max_rel_err(a, b) -> float:
    """Largest per-tensor ``||a - b|| / ||b||`` (absolute where ``b`` is zero)."""
    # A conv bias followed by BatchNorm has a gradient that is zero up to rounding: relative
    # error is meaningless there, so norms are floored at 1e-4 of the largest gradient norm.
    floor = 1e-4 * max(y.norm().item() for y in b if y is not None)
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is None:
            continue
        worst = max(worst, (x - y).norm().item() / max(y.norm().item(), floor))
    return worst


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests: on a busy machine two OpenMP
    threads waiting on each other at every op made them 10-80x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def inline_net() -> nn.Module:
    torch.manual_seed(0)
    return InlineNet()


@pytest.fixture
def converted_resnet18() -> nn.Module:
    model = timm_model("resnet18", drop_path_rate=0.2)
    return revify.convert(model, torch.zeros(2, 3, 32, 32))


def deepcopy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def counting(hook):
    """``hook`` (a module hook that reads no tensor: it counts calls) marked as revify's own, so
    that it does not make the stage it observes run as ordinary autograd (NOTE [ Forward hooks
    inside stages ] in revify/_replay.py) and counts what the reversible path runs."""
    return own_hook(hook)
