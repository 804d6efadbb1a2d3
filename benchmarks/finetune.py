"""Fine-tuning locally pretrained timm backbones: does revify keep what the pretrained weights know?

Three families, each narrow enough for one CPU thread: a ResNet-34 (BasicBlocks, BatchNorm), a
ConvNeXt (depthwise conv, LayerNorm, layer scale) and a ViT (attention, LayerNorm). Protocol,
the same for every family (everything offline, on CPU, scikit-learn's 8x8 handwritten digits):

1. **Pre-train** the family's model from scratch on digits 0-4 (images upscaled to 32 px,
   3 channels, random shifts of up to 3 px) and save its ``state_dict`` to a file.
2. **Load** it the way users load local pretrained weights::

       timm.create_model(arch, pretrained=True, num_classes=5,
                         pretrained_cfg_overlay=dict(file=path, num_classes=5), **arch_kwargs)

   ``file`` makes timm read the file (it takes precedence over the URL and Hugging Face hub
   sources of the registry's config, so nothing is downloaded). ``num_classes=5`` in the overlay
   tells timm how many classes the *checkpoint* has: timm compares the model's ``num_classes``
   with ``pretrained_cfg['num_classes']`` (1000 for ``resnet34``) and, when they differ, drops
   the checkpoint's classifier and loads the rest non-strictly, which would leave the 5-class
   head we trained randomly initialised without an error. The script checks that every loaded
   tensor equals the file's.
3. **Convert** and measure the **top-1 agreement** with the pretrained model and the relative
   output (logit) error ``||f_converted(x) - f(x)|| / ||f(x)||`` on the digits 0-4 test images
   through the pretrained 5-class head, before any fine-tuning (eval mode).
4. **Fine-tune** on digits 5-9 (a new, seeded 5-class head: ``reset_classifier(5)``) with the
   same steps, optimizer, data order, augmentation and head initialisation for every method, over
   several seeds (each seed draws its own training subset, order and head):

   - ``plain``: ordinary autograd;
   - ``timm-ckpt``: timm's ``set_grad_checkpointing(True)``;
   - ``revnet``: ``revify.convert(model, x, **REVNET)``, the RevNet coupling ``alpha=0, beta=1``;
   - ``default``: ``revify.convert(model, x, **DEFAULT)``, the coupling issue 12 makes
     ``convert``'s default (``_common.DEFAULT``: the faithful ``alpha=63/64, beta=1/64,
     exact=True``, passed explicitly until ``convert``'s own default changes);
   - ``faithful+schedule`` (only with ``--methods``): the faithful conversion with a
     ``revify.Schedule`` that holds it for the first third of the steps, moves to
     ``alpha=0, beta=1`` over the second third and trains the last third there;
   - ``default/autograd`` (only with ``--methods``): the ``default`` conversion trained under
     ``revify.plain_autograd()``, i.e. the same converted function with ordinary autograd. It
     separates what the coupling's change of function does to fine-tuning from what revify's
     reversible backward does (the two should agree to rounding).

   Per family, the optimizer is the one that family is usually trained with (SGD for the
   ResNet, AdamW for ConvNeXt and ViT), the same for every method.
5. **Memory**: bytes saved for backward by one training forward, for each method, on the
   architecture trained here (32 px, the fine-tuning batch) and on the family's standard timm
   model (224x224, batch 2, random weights), counted with ``saved_bytes.count_saved_bytes``
   (saved-tensor hooks, one count per storage, parameters left out). timm is switched to
   re-entrant checkpointing for that count only, so that the inputs its checkpoints keep go
   through the hooks (see ``saved_bytes.py``).
6. **Time**: median training-step time of each method on the fine-tuning batch, all methods built
   in this process and their steps interleaved after warm-up (so that load drift on a shared
   machine hits them alike), with ratios to plain training and to timm checkpointing.

Initialisation for pre-training (``--timm-init`` to use timm's defaults instead): timm zeroes
the last norm of every ResNet residual branch (``zero_init_last=True``) and starts ConvNeXt's
layer scale at 1e-6, and a few hundred steps on digits leave those branches small, so *every*
coupling is then close to the original network and the comparison says little about pretrained
backbones, whose branches are live (DESIGN.md §3). Here the ResNet is built with
``zero_init_last=False`` and ConvNeXt with ``ls_init_value=1.0``; the ViT has no layer scale.
The median ``|U(h) - h| / |h|`` over the identity units of each pretrained model is reported.

Threads: ``--threads 1`` by default. On a 2-core machine shared with other jobs, two OpenMP
threads made a step 4x slower than one (spinning threads waiting for a descheduled peer).

Writes ``docs/finetune.md`` (tables and machine), ``docs/finetune.png`` (learning curves) and,
with ``--json``, every number. The defaults took 54 minutes on one thread of a shared, busy
2-core machine::

    .venv/bin/python benchmarks/finetune.py --json benchmarks/results/finetune.json
    .venv/bin/python benchmarks/finetune.py --seeds 1 --steps 20 --pretrain-steps 50 \\
        --out /tmp/finetune  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import timm
import torch
import torch.nn.functional as F
from _common import (
    DEFAULT,
    FAITHFUL,
    REVNET,
    console,
    environment,
    mib,
    parse_list,
    ratio,
    write_json,
)
from rich.table import Table
from saved_bytes import count_saved_bytes
from sklearn.datasets import load_digits
from timm.models.convnext import ConvNeXtBlock
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block as ViTBlock
from torch import Tensor, nn

import revify

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the non-interactive backend)

_ROOT = Path(__file__).resolve().parent.parent
METHODS: tuple[str, ...] = ("plain", "timm-ckpt", "revnet", "default", "faithful+schedule",
                             "default/autograd")
DEFAULT_METHODS: tuple[str, ...] = ("plain", "timm-ckpt", "revnet", "default")
# revify.convert options of the converting methods.
_CONVERT: dict[str, dict[str, Any]] = {"revnet": REVNET, "default": DEFAULT,
                                       "faithful+schedule": FAITHFUL, "default/autograd": DEFAULT}
# Methods trained under revify.plain_autograd(): the converted function, ordinary autograd.
_PLAIN_AUTOGRAD = ("default/autograd",)
# The conversion whose agreement at step 0 a method starts from.
_AGREEMENT_OF = {"faithful+schedule": "default", "default/autograd": "default"}
# Extra conversions whose agreement with the pretrained model is reported (no fine-tuning).
_AGREEMENT_ONLY = {
    "exact alpha=0, beta=1": dict(alpha=0.0, beta=1.0, exact=True),
    "exact alpha=1, beta=1/64": dict(alpha=1.0, beta=1 / 64, exact=True),
    "exact alpha=15/16, beta=1/16": dict(alpha=15 / 16, beta=1 / 16, exact=True),
}
_SHIFT = 3  # random shifts of up to 3 px at 32 px (under one pixel of the 8x8 original)
_SIZE = 32
_TARGET_AGREEMENT, _TARGET_ERROR, _TARGET_PP = 0.99, 0.05, 0.3  # issue 12, for `default`


# ----------------------------------------------------------------------------------------------
# Families
@dataclass
class Family:
    """One architecture family of the benchmark and its training recipe.

    Args:
        name: ``--families`` name.
        arch: timm model name.
        arch_kwargs: timm kwargs that narrow the model for the CPU (its structure).
        live_init: timm kwargs of the pre-training initialisation with live residual branches.
        timm_init: the same kwargs at timm's defaults (``--timm-init``).
        standard: the family's standard timm model, for the memory rows at 224 px.
        optimizer: ``"sgd"`` (momentum 0.9, Nesterov) or ``"adamw"``, for both phases.
        weight_decay, pretrain_lr, pretrain_steps, lr, steps: the recipe (``lr`` and
            ``steps`` for fine-tuning), chosen on ``plain``.
    """

    name: str
    arch: str
    arch_kwargs: dict[str, Any]
    live_init: dict[str, Any] = field(default_factory=dict)
    timm_init: dict[str, Any] = field(default_factory=dict)
    standard: str = ""
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    pretrain_lr: float = 0.05
    pretrain_steps: int = 300
    lr: float = 0.02
    steps: int = 150

    def describe(self) -> str:
        kw = ", ".join(f"{k}={v}" for k, v in self.arch_kwargs.items())
        return f"`{self.arch}({kw})`"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("resnet", "resnet34", dict(channels=(16, 32, 64, 128)),
           live_init=dict(zero_init_last=False), timm_init=dict(zero_init_last=True),
           standard="resnet34"),
    Family("convnext", "convnext_atto", dict(dims=(16, 32, 64, 128)),
           live_init=dict(ls_init_value=1.0), timm_init=dict(ls_init_value=1e-6),
           standard="convnext_atto", optimizer="adamw", weight_decay=0.05,
           pretrain_lr=2e-3, lr=5e-4),
    Family("vit", "vit_tiny_patch16_224",
           dict(img_size=_SIZE, patch_size=8, embed_dim=64, depth=6, num_heads=2),
           standard="vit_tiny_patch16_224", optimizer="adamw", weight_decay=0.05,
           pretrain_lr=1e-3, pretrain_steps=1000, lr=5e-4, steps=300),
)}


def identity_units(model: nn.Module) -> list[nn.Module]:
    """The stride-1 identity residual blocks of the three families (the units revify couples)."""
    units = []
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)) and m.downsample is None:
            units.append(m)
        elif isinstance(m, ConvNeXtBlock) and isinstance(m.shortcut, nn.Identity):
            units.append(m)
        elif isinstance(m, ViTBlock):
            units.append(m)
    return units


# ----------------------------------------------------------------------------------------------
# Data
@dataclass
class Digits:
    """Digits upscaled to (N, 3, size, size) and standardised; labels 0-4 in both tasks.

    ``pre_*``: digits 0-4, a stratified 75/25 split. ``ft_pool`` / ``ft_test``: digits 5-9
    (labels shifted to 0-4) split 50/50; each seed draws its training subset from the pool.
    ``background`` is the standardised value of an empty pixel (the padding of random shifts).
    """

    pre_x: Tensor
    pre_y: Tensor
    pre_test_x: Tensor
    pre_test_y: Tensor
    ft_pool_x: Tensor
    ft_pool_y: Tensor
    ft_test_x: Tensor
    ft_test_y: Tensor
    background: float


def load_data(size: int, seed: int = 0) -> Digits:
    """Split scikit-learn's digits into the pre-training and fine-tuning tasks (no download)."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)

    def split(mask: Tensor, test_share: float) -> tuple[Tensor, Tensor]:
        parts = []
        for c in labels[mask].unique():  # stratified: the same share of every class
            idx = torch.nonzero(labels == c).flatten()
            parts.append(idx[torch.randperm(len(idx), generator=gen)])
        first = torch.cat([p[: len(p) - round(len(p) * test_share)] for p in parts])
        second = torch.cat([p[len(p) - round(len(p) * test_share):] for p in parts])
        return first, second

    pre_train, pre_test = split(labels < 5, 0.25)
    ft_pool, ft_test = split(labels >= 5, 0.5)
    mean, std = images[pre_train].mean(), images[pre_train].std()
    images = (images - mean) / std
    return Digits(
        images[pre_train], labels[pre_train], images[pre_test], labels[pre_test],
        images[ft_pool], labels[ft_pool] - 5, images[ft_test], labels[ft_test] - 5,
        background=float(-mean / std),
    )


def shifted(x: Tensor, gen: torch.Generator, background: float, shift: int = _SHIFT) -> Tensor:
    """``x`` (B, C, H, W) with each image moved by a random whole-pixel offset in
    ``[-shift, shift]`` along both axes; uncovered pixels take the ``background`` value."""
    _, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=background)
    offsets = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, r : r + h, c : c + w] for i, (r, c) in enumerate(offsets)])


def subset(x: Tensor, y: Tensor, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """``per_class`` images of each class drawn with ``seed`` (all of them when 0)."""
    if per_class <= 0:
        return x, y
    gen = torch.Generator().manual_seed(seed)
    idx = [torch.nonzero(y == c).flatten() for c in y.unique()]
    keep = torch.cat([i[torch.randperm(len(i), generator=gen)[:per_class]] for i in idx])
    return x[keep], y[keep]


# ----------------------------------------------------------------------------------------------
# Models
def load_pretrained(family: Family, path: Path, num_classes: int = 5) -> nn.Module:
    """The user's path: timm reads ``path`` through ``pretrained_cfg_overlay`` (see module doc).

    Raises:
        RuntimeError: a tensor of the built model differs from the file's (the file was not
            what got loaded, e.g. timm dropped the classifier).
    """
    model = timm.create_model(
        family.arch, pretrained=True, num_classes=num_classes,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes),
        **family.arch_kwargs, **family.timm_init,  # init is overwritten by the file
    )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    loaded = model.state_dict()
    differ = [k for k in saved if k not in loaded or not torch.equal(saved[k], loaded[k])]
    if differ or set(loaded) != set(saved):
        raise RuntimeError(
            f"benchmarks/finetune: timm did not load {path} as is: {len(differ)} tensors differ "
            f"(first: {differ[:3]}), keys {sorted(set(loaded) ^ set(saved))[:3]} unmatched"
        )
    return model


def example_input(batch: int = 2) -> Tensor:
    """The conversion's example input: the size the models are built for, passed explicitly
    (convert's default comes from ``pretrained_cfg['input_size']``, 224, not the ViT's 32)."""
    return torch.zeros(batch, 3, _SIZE, _SIZE)


def prepare(model: nn.Module, method: str) -> nn.Module:
    """Set ``model`` (pretrained, train mode) up for ``method``, in place."""
    if method == "timm-ckpt":
        model.set_grad_checkpointing(True)
    elif method in _CONVERT:
        revify.convert(model, example_input(), strict=True, **_CONVERT[method])
    elif method != "plain":
        raise ValueError(f"benchmarks/finetune: unknown method {method!r}")
    return model


def schedule_for(model: nn.Module, method: str, steps: int) -> revify.Schedule | None:
    """The ``faithful+schedule`` schedule: hold the faithful coupling for a third of the steps,
    move to ``(0, 1)`` over the next third, and train there for the last third."""
    if method != "faithful+schedule":
        return None
    hold = steps // 3
    return revify.Schedule(model, steps=max(steps - 2 * hold, 1), warmup=hold)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
def make_optimizer(model: nn.Module, family: Family, lr: float, steps: int
                   ) -> tuple[torch.optim.Optimizer, Any]:
    """The family's optimizer with a cosine learning rate over ``steps``."""
    if family.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, nesterov=True,
            weight_decay=family.weight_decay)
    elif family.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=family.weight_decay)
    else:
        raise ValueError(f"benchmarks/finetune: unknown optimizer {family.optimizer!r}")
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    """Logits (N, classes) in eval mode; the model's train/eval flags are put back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    finally:
        for m, t in modes.items():
            m.training = t


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).double().mean())


def train(
    model: nn.Module,
    family: Family,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    background: float,
    on_step: Callable[[int], None] | None = None,
    schedule: revify.Schedule | None = None,
    plain_autograd: bool = False,
) -> list[float]:
    """The family's optimizer (cosine learning rate) on random shifted mini-batches; returns
    the losses.

    The batches and shifts come from a generator seeded with ``seed``, so every method sees the
    same data in the same order. ``on_step(i)`` runs after step ``i`` (and with ``i = 0``
    before the first step). ``plain_autograd``: run the steps under ``revify.plain_autograd()``.
    """
    optimizer, lr_schedule = make_optimizer(model, family, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    if on_step:
        on_step(0)
    for i in range(1, steps + 1):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        with revify.plain_autograd() if plain_autograd else contextlib.nullcontext():
            loss = F.cross_entropy(model(shifted(x[idx], gen, background)), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
        if on_step:
            on_step(i)
    return losses


def pretrain(args: argparse.Namespace, family: Family, data: Digits, path: Path
             ) -> dict[str, Any]:
    """Train on digits 0-4 from scratch and save the ``state_dict`` to ``path``."""
    torch.manual_seed(args.pretrain_seed)
    init = family.timm_init if args.timm_init else family.live_init
    model = timm.create_model(family.arch, pretrained=False, num_classes=5,
                              **family.arch_kwargs, **init)
    steps = args.pretrain_steps or family.pretrain_steps
    lr = args.pretrain_lr or family.pretrain_lr
    start = time.perf_counter()
    losses = train(model, family, data.pre_x, data.pre_y, steps=steps,
                   batch=args.pretrain_batch, lr=lr, seed=args.pretrain_seed,
                   background=data.background)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), path)
    return dict(steps=steps, lr=lr, init=init, seconds=seconds, final_loss=losses[-1],
                parameters=sum(p.numel() for p in model.parameters()),
                test_accuracy=accuracy(model, data.pre_test_x, data.pre_test_y),
                branch_ratio=branch_ratio(model, data.pre_test_x))


@torch.no_grad()
def branch_ratio(model: nn.Module, x: Tensor) -> float:
    """Median over identity units of ``||U(h) - h|| / ||h||`` (eval mode): how live the
    residual branches are (0 for timm's ResNet initialisation with ``zero_init_last=True``)."""
    ratios: list[float] = []

    def hook(block: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        h = inputs[0]
        ratios.append(float((out - h).norm() / h.norm()))

    handles = [b.register_forward_hook(hook) for b in identity_units(model)]
    try:
        predict(model, x)
    finally:
        for h in handles:
            h.remove()
    return statistics.median(ratios) if ratios else float("nan")


def fidelity(family: Family, data: Digits, path: Path) -> list[dict[str, Any]]:
    """Agreement with the pretrained model right after conversion, digits 0-4 test images."""
    reference = predict(load_pretrained(family, path), data.pre_test_x)
    settings: dict[str, dict[str, Any] | None] = {
        "plain": None, "timm-ckpt": None, "revnet": REVNET, "default": DEFAULT, **_AGREEMENT_ONLY,
    }
    rows = []
    for name, convert_kwargs in settings.items():
        model = load_pretrained(family, path)
        if name == "timm-ckpt":
            model.set_grad_checkpointing(True)
        row: dict[str, Any] = dict(setting=name)
        if convert_kwargs is not None:
            revify.convert(model, example_input(), strict=True, **convert_kwargs)
            report = revify.check(model, data.pre_test_x, gradients=False)
            row.update(check_output_rel_error=report.output_rel_error,
                       check_top1_agreement=report.top1_agreement,
                       stage_units=[len(st.units) for st in revify.stages(model)])
        logits = predict(model, data.pre_test_x)
        row["top1_agreement"] = float((logits.argmax(1) == reference.argmax(1)).double().mean())
        row["output_rel_error"] = float((logits - reference).norm() / reference.norm())
        row["accuracy_0_4"] = float((logits.argmax(1) == data.pre_test_y).double().mean())
        rows.append(row)
    return rows


def finetune(args: argparse.Namespace, family: Family, data: Digits, path: Path
             ) -> list[dict[str, Any]]:
    """One run per seed and method; the curves are test accuracy every ``--eval-every`` steps."""
    runs = []
    lr, steps = args.lr or family.lr, args.steps or family.steps
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        x, y = subset(data.ft_pool_x, data.ft_pool_y, args.train_per_class, seed)
        for method in args.methods:
            model = prepare(load_pretrained(family, path), method)
            torch.manual_seed(seed)  # the same new head for every method
            model.reset_classifier(5)
            schedule = schedule_for(model, method, steps)
            curve: list[tuple[int, float]] = []

            def evaluate(i: int, model: nn.Module = model, curve: list = curve) -> None:
                if i % args.eval_every == 0 or i == steps:
                    curve.append((i, accuracy(model, data.ft_test_x, data.ft_test_y)))

            start = time.perf_counter()
            losses = train(model, family, x, y, steps=steps, batch=args.batch, lr=lr,
                           seed=1000 + seed, background=data.background, on_step=evaluate,
                           schedule=schedule, plain_autograd=method in _PLAIN_AUTOGRAD)
            seconds = time.perf_counter() - start
            errors = [st.last_reconstruction_error for st in revify.stages(model)]
            runs.append(dict(
                family=family.name, method=method, seed=seed, train_images=len(y),
                losses=losses, curve=curve, test_accuracy=curve[-1][1], seconds=seconds,
                final_coefficients=schedule.coefficients() if schedule else None,
                max_reconstruction_error=max((float(e) for e in errors if e is not None),
                                             default=None),
            ))
            console().print(f"  {family.name} seed {seed} {method:<18} test accuracy "
                            f"{curve[-1][1]:.2%} ({seconds:.0f} s)")
    return runs


# ----------------------------------------------------------------------------------------------
# Memory and time
@contextmanager
def _reentrant_timm_checkpoints() -> Iterator[None]:
    previous = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(True)
    try:
        yield
    finally:
        timm.layers.set_reentrant_ckpt(previous)


def saved_bytes(args: argparse.Namespace, family: Family) -> list[dict[str, Any]]:
    """Bytes saved for backward by one training forward (random weights: only shapes matter):
    the architecture trained here on the fine-tuning batch at 32 px, and the family's standard
    model at 224 px, batch 2."""
    architectures = {
        f"{family.arch} as trained here, {_SIZE} px, batch {args.batch}":
            (family.arch, family.arch_kwargs, args.batch, _SIZE),
        f"{family.standard} (standard), 224 px, batch 2": (family.standard, {}, 2, 224),
    }
    settings = {m: _CONVERT.get(m) for m in args.methods
                if m not in ("faithful+schedule", *_PLAIN_AUTOGRAD)}
    if "faithful+schedule" in args.methods:  # the coupling at the schedule's end
        settings["exact alpha=0, beta=1"] = _AGREEMENT_ONLY["exact alpha=0, beta=1"]
    rows = []
    with _reentrant_timm_checkpoints():
        for label, (arch, kwargs, batch, size) in architectures.items():
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, 3, size, size, generator=gen)
            target = torch.randint(0, 5, (batch,), generator=gen)
            group = []
            for name, convert_kwargs in settings.items():
                torch.manual_seed(0)
                model = timm.create_model(arch, num_classes=5, **kwargs,
                                          **family.live_init).train()
                if name == "timm-ckpt":
                    model.set_grad_checkpointing(True)
                elif convert_kwargs is not None:
                    revify.convert(model, torch.zeros(2, 3, size, size), strict=True,
                                   **convert_kwargs)
                n_bytes, n_saved = count_saved_bytes(model, x, target)
                group.append(dict(architecture=label, setting=name, bytes=n_bytes,
                                  saved_tensors=n_saved))
            by = {r["setting"]: r["bytes"] for r in group}
            for r in group:
                r["vs_plain"] = ratio(r["bytes"], by["plain"])
                r["vs_timm_ckpt"] = ratio(r["bytes"], by["timm-ckpt"])
            rows += group
    return rows


def step_times(args: argparse.Namespace, family: Family, data: Digits, path: Path
               ) -> list[dict[str, Any]]:
    """Median step time per method on one fixed fine-tuning batch, steps interleaved.

    ``default`` is timed at its coupling and ``faithful+schedule`` at the end of its
    schedule, ``alpha=0, beta=1`` (still with exact streams).
    """
    x, y = data.ft_pool_x[: args.batch], data.ft_pool_y[: args.batch]
    runs: dict[str, Callable[[], None]] = {}
    for method in args.methods:
        model = prepare(load_pretrained(family, path), method)
        if method == "faithful+schedule":  # `default` times the start: time the end here
            for st in revify.stages(model):
                st.alpha, st.beta = 0.0, 1.0
        optimizer, _ = make_optimizer(model, family, args.lr or family.lr, 1)
        model.train()

        def step(model: nn.Module = model, optimizer: Any = optimizer,
                 plain: bool = method in _PLAIN_AUTOGRAD) -> None:
            with revify.plain_autograd() if plain else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()

        runs[method] = step
    times: dict[str, list[float]] = {m: [] for m in runs}
    for i in range(args.time_warmup + args.time_steps):
        for method, step in runs.items():
            start = time.perf_counter()
            step()
            if i >= args.time_warmup:
                times[method].append(time.perf_counter() - start)
    medians = {m: statistics.median(ts) for m, ts in times.items()}

    def paired(m: str, base: str) -> float:  # per round: cancels load drift between rounds
        return statistics.median(a / b for a, b in zip(times[m], times[base], strict=True))

    return [dict(method=m, batch=args.batch, median_s=medians[m], times_s=times[m],
                 vs_plain=paired(m, "plain"), vs_timm_ckpt=paired(m, "timm-ckpt"))
            for m in runs]


# ----------------------------------------------------------------------------------------------
# Report
def summarise(runs: list[dict[str, Any]], methods: list[str], steps: int
              ) -> dict[str, dict[str, float]]:
    """Per method: final test accuracy (mean, std over seeds), its per-seed difference from
    ``plain`` (mean and standard error: the methods share data, order and head per seed), wall
    time per run, and the lowest seed-mean test accuracy after the first third of the steps."""
    out = {}
    plain = {r["seed"]: r["test_accuracy"] for r in runs if r["method"] == "plain"}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        acc = [r["test_accuracy"] for r in mine]
        diff = [r["test_accuracy"] - plain[r["seed"]] for r in mine]
        curve = torch.tensor([[a for i, a in r["curve"] if i >= steps // 3] for r in mine])
        out[m] = dict(mean=statistics.fmean(acc),
                      std=statistics.stdev(acc) if len(acc) > 1 else 0.0, n=len(acc),
                      vs_plain=statistics.fmean(diff),
                      vs_plain_se=statistics.stdev(diff) / math.sqrt(len(diff))
                      if len(diff) > 1 else 0.0,
                      seconds=statistics.fmean(r["seconds"] for r in mine),
                      lowest_after_third=float(curve.mean(0).min()))
    return out


def plot(result: dict[str, Any], runs: list[dict[str, Any]], path: Path) -> None:
    """Per family (rows): test accuracy (left) and training loss (right) against step, mean
    over seeds."""
    methods = result["args"]["methods"]
    names = list(result["families"])
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.8 * len(names)), squeeze=False)
    for (ax_acc, ax_loss), name in zip(axes, names, strict=True):
        n_seeds = 0
        for m in methods:
            mine = [r for r in runs if r["method"] == m and r["family"] == name]
            n_seeds = len(mine)
            steps = [s for s, _ in mine[0]["curve"]]
            accs = torch.tensor([[a for _, a in r["curve"]] for r in mine])
            ax_acc.plot(steps, accs.mean(0) * 100, marker=".", label=m)
            losses = torch.tensor([r["losses"] for r in mine]).mean(0)
            window = max(len(losses) // 20, 1)  # moving average over 5 % of the run
            smooth = losses.unfold(0, window, 1).mean(1)
            ax_loss.plot(range(window, len(losses) + 1), smooth, label=m)
        arch = result["families"][name]["arch"]
        ax_acc.set(xlabel="fine-tuning step", ylabel="test accuracy, digits 5-9 (%)",
                   title=f"{name} ({arch}): test accuracy, mean over {n_seeds} seeds")
        ax_loss.set(xlabel="fine-tuning step", ylabel="training loss (moving average)",
                    yscale="log", title=f"{name}: training loss")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def coupling_text(kwargs: dict[str, Any]) -> str:
    """``alpha=63/64, beta=1/64, exact=True`` for a dict of convert options."""

    def frac(v: float) -> str:
        if v in (0.0, 1.0):
            return f"{v:g}"
        d = round(1 / (1 - v)) if v > 0.5 else round(1 / v)
        return f"{d - 1}/{d}" if v > 0.5 else f"1/{d}"

    return ", ".join(f"{k}={frac(v) if isinstance(v, float) else v}" for k, v in kwargs.items())


def _extra_methods_text(methods: list[str]) -> str:
    text = ""
    if "default/autograd" in methods:
        text += (" `default/autograd` is the `default` conversion trained under "
                 "`revify.plain_autograd()`: the same converted function with ordinary autograd, "
                 "which tells the coupling's change of function from revify's backward.")
    if "faithful+schedule" in methods:
        text += (" `faithful+schedule` converts with `alpha=63/64, beta=1/64, exact=True` and a "
                 "`revify.Schedule` that holds it for the first third of the steps, moves to "
                 "`alpha=0, beta=1` over the second third and trains the last third there.")
    return text


def _pp(x: float) -> str:
    return f"{x * 100:+.2f} pp"


def markdown(result: dict[str, Any], image: str = "finetune.png") -> str:
    """``docs/finetune.md``; ``image`` is the learning-curve plot's file name."""
    args, env = result["args"], result["environment"]
    methods = args["methods"]
    fams = result["families"]
    default_options = result["couplings"]["default"]
    default_text = (f"`revify.convert(model, x, {coupling_text(default_options)})`, the coupling "
                    "issue 12 makes `revify.convert`'s default, passed explicitly in this run"
                    if default_options else
                    "`revify.convert(model, x)` with no coupling options: the library's default")
    lines = [
        "# Fine-tuning pretrained backbones with revify",
        "",
        "Generated by `benchmarks/finetune.py` (see its docstring for the protocol). "
        f"Command: `.venv/bin/python benchmarks/finetune.py {result['argv']}`"
        + (f"; every number is in `{args['json']}`." if args.get("json") else "."),
        "",
        f"Families: {', '.join(fams)}. Each is pre-trained here from scratch on digits 0-4, "
        "saved as a timm checkpoint, loaded with `timm.create_model(arch, pretrained=True, "
        "num_classes=5, pretrained_cfg_overlay=dict(file=path, num_classes=5), **arch_kwargs)` "
        "(every tensor checked equal to the file's; without `num_classes` in the overlay timm "
        "silently drops the 5-class head: it compares with the registry's 1000 classes), "
        "converted, and "
        "fine-tuned on digits 5-9. Methods: `plain` (ordinary autograd), `timm-ckpt` "
        "(`set_grad_checkpointing(True)`), `revnet` (`revify.convert(model, x, "
        f"{coupling_text(result['couplings']['revnet'])})`, the RevNet coupling) and `default` "
        f"({default_text}). Every conversion gets the example input "
        f"`torch.zeros(2, 3, {_SIZE}, {_SIZE})`." + _extra_methods_text(methods),
        "",
        "## Summary",
        "",
        f"Targets (issue 12) for `default`: ≥ {_TARGET_AGREEMENT:.0%} top-1 agreement and "
        f"≤ {_TARGET_ERROR:.0%} output error at conversion; mean fine-tuning test accuracy within "
        f"{_TARGET_PP} pp of `plain`. *Agreement* and *error* are measured right after "
        "conversion on the digits 0-4 test images through the pretrained head, in eval mode: "
        "top-1 agreement with the pretrained model and `||f_converted(x) - f(x)|| / ||f(x)||` "
        "of the logits. Test accuracy (digits 5-9) is the mean ± std over seeds at the end of "
        "fine-tuning; *− plain* is the mean per-seed difference from `plain` ± its standard "
        "error (all methods share a seed's data, order, shifts and head).",
        "",
        "| family | `\\|U(h)-h\\|/\\|h\\|` | default: agreement, error | revnet: agreement, "
        "error | plain | timm-ckpt | revnet (− plain) | default (− plain) | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, fam in fams.items():
        s = fam["summary"]
        agree = {r["setting"]: r for r in fam["fidelity"]}
        d, rv = agree["default"], agree["revnet"]

        def acc(m: str, s: dict = s) -> str:
            if m not in s:
                return "-"
            text = f"{s[m]['mean']:.2%} ± {s[m]['std']:.2%}"
            return text if m in ("plain", "timm-ckpt") else f"{text} ({_pp(s[m]['vs_plain'])})"

        met = []
        met.append("agreement ✓" if d["top1_agreement"] >= _TARGET_AGREEMENT else "agreement ✗")
        met.append("error ✓" if d["output_rel_error"] <= _TARGET_ERROR else "error ✗")
        if "default" in s:
            gap = s["default"]["vs_plain"]
            met.append("accuracy ✓" if abs(gap) * 100 <= _TARGET_PP else
                       f"accuracy ✗ ({'above' if gap > 0 else 'below'} plain)")
        lines.append(
            f"| {name} | {fam['pretrain']['branch_ratio']:.2f} | "
            f"{d['top1_agreement']:.1%}, {d['output_rel_error']:.3f} | "
            f"{rv['top1_agreement']:.1%}, {rv['output_rel_error']:.3f} | "
            f"{acc('plain')} | {acc('timm-ckpt')} | {acc('revnet')} | {acc('default')} | "
            f"{', '.join(met)} |")
    lines += [
        "",
        f"![learning curves]({image})",
        "",
        "## Protocol",
        "",
        f"Data: scikit-learn's 8x8 digits, upscaled to {_SIZE} px, 3 channels, standardised, "
        f"random shifts of up to {_SHIFT} px in training. Pre-training on digits 0-4 "
        f"({result['sizes']['pre_train']} images), {args['pretrain_batch']} images a step; "
        f"fine-tuning on digits 5-9, {args['train_per_class']} training images per class drawn "
        f"per seed, {result['sizes']['ft_test']} test images, batches of {args['batch']}, "
        "cosine learning rate, a new seeded head, the same data order and "
        f"shifts for every method; {args['seeds']} seeds. SGD is with momentum 0.9 "
        "(Nesterov), AdamW with PyTorch's betas; the optimizer and learning rates of a family "
        "are the same for every method (chosen for `plain`).",
        "",
        "Pre-training initialisation: "
        + ("timm's defaults (`--timm-init`)." if args.get("timm_init") else
           "live residual branches (the ResNet with `zero_init_last=False`, ConvNeXt with "
           "`ls_init_value=1.0` instead of timm's 1e-6; the ViT has no layer scale): with "
           "timm's zero-initialised branches, a short pre-training leaves them small and every "
           "coupling stays close to the original network, unlike real pretrained backbones "
           "(DESIGN.md §3)."),
    ]
    for name, fam in fams.items():
        lines += _family_section(name, fam, methods, args)
    if result.get("notes"):
        lines += ["", "## Notes", ""]
        for note in result["notes"]:
            lines += [note, ""]
        lines.pop()
    cpu = env["machine"] + (f", {env['processor']}" if env.get("processor") else "")
    load = ", ".join(f"{v:.1f}" for v in env.get("loadavg_1_5_15min", []))
    lines += [
        "",
        "## Machine",
        "",
        f"{env['cpu_count']} CPU cores ({cpu}), {env['torch_threads']} torch thread(s), no GPU; "
        f"torch {env['torch']}, timm {env['timm']}, revify {env['revify']}, "
        f"Python {env['python']}. Load average (1, 5, 15 min) at the end: "
        f"{load}; the machine is shared with other jobs, so step times are noisy (the "
        f"interleaved ratios less so). revify source: {result.get('revify_source', '?')}. "
        f"Total run time {result['seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def _family_section(name: str, fam: dict[str, Any], methods: list[str], args: dict[str, Any]
                    ) -> list[str]:
    pre, s = fam["pretrain"], fam["summary"]
    agree = {r["setting"]: r for r in fam["fidelity"]}
    units = agree["default"].get("stage_units", [])
    init = ", ".join(f"`{k}={v}`" for k, v in pre["init"].items()) or "timm's defaults"
    lines = [
        "",
        f"## {name}: {fam['describe']}",
        "",
        f"{pre['parameters'] / 1e6:.2f} M parameters; revify's reversible stages have "
        f"{', '.join(map(str, units))} units. Pre-training: {init}, {fam['optimizer']} "
        f"(weight decay {fam['weight_decay']:g}), {pre['steps']} steps from learning rate "
        f"{pre['lr']:g}, {pre['seconds']:.0f} s: test accuracy {pre['test_accuracy']:.1%}, "
        f"median `|U(h) - h| / |h|` of the identity units {pre['branch_ratio']:.2f}. "
        f"Fine-tuning: {fam['steps']} steps from learning rate {fam['lr']:g}.",
        "",
        "| method | top-1 agreement at conversion | test accuracy 5-9 (mean ± std) | − plain "
        f"(± s.e.) | lowest mean test accuracy after step {fam['steps'] // 3} | "
        "wall time per run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        r = agree.get(_AGREEMENT_OF.get(m, m))
        a = f"{r['top1_agreement']:.1%}" if r else "-"
        lines.append(f"| {m} | {a} | {s[m]['mean']:.2%} ± {s[m]['std']:.2%} | "
                     f"{_pp(s[m]['vs_plain'])} ± {s[m]['vs_plain_se'] * 100:.2f} | "
                     f"{s[m]['lowest_after_third']:.1%} | {s[m]['seconds']:.0f} s |")
    lines += [
        "",
        "At conversion (digits 0-4 test images, pretrained head, eval mode): top-1 agreement "
        "with a separately loaded original, the same from `revify.check(model, x, "
        "gradients=False)` (against the original code of the converted model), relative "
        "output error, accuracy:",
        "",
        "| setting | top-1 agreement | `revify.check` agreement | output rel. error | "
        "accuracy 0-4 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in fam["fidelity"]:
        checked = r.get("check_top1_agreement")
        lines.append(f"| {r['setting']} | {r['top1_agreement']:.1%} | "
                     f"{'-' if checked is None else f'{checked:.1%}'} | "
                     f"{r['output_rel_error']:.3f} | {r['accuracy_0_4']:.1%} |")
    lines += [
        "",
        "Bytes saved for backward by one training forward (saved-tensor hooks, one count per "
        "storage, parameters excluded; timm checkpoints re-entrant for the count; random "
        "weights):",
        "",
        "| architecture | setting | saved MiB | ÷ plain | ÷ timm-ckpt |",
        "|---|---|---:|---:|---:|",
    ]
    for r in fam["saved_bytes"]:
        lines.append(f"| {r['architecture']} | {r['setting']} | {mib(r['bytes']):.2f} | "
                     f"{r['vs_plain']:.3f} | {r['vs_timm_ckpt']:.2f} |")
    times = {r["method"]: r for r in fam["step_times"]}
    batch = fam["step_times"][0]["batch"]
    lines += [
        "",
        f"Training step on the fine-tuning batch ({batch} images, {_SIZE} px), methods "
        f"interleaved in one process, {args['time_warmup']} warm-up and {args['time_steps']} "
        "timed rounds; ratios are medians of per-round ratios:",
        "",
        "| method | median ms | ÷ plain | ÷ timm-ckpt |",
        "|---|---:|---:|---:|",
    ]
    for m in methods:
        t = times[m]
        lines.append(f"| {m} | {t['median_s'] * 1e3:.0f} | {t['vs_plain']:.2f} | "
                     f"{t['vs_timm_ckpt']:.2f} |")
    return lines


def display(result: dict[str, Any]) -> None:
    methods = result["args"]["methods"]
    table = Table(title="Fine-tuning on digits 5-9")
    for col in ("family", "method", "agreement", "out err", "test acc", "± std", "- plain",
                "step ms", "÷ plain", "÷ timm-ckpt"):
        table.add_column(col, justify="left" if col in ("family", "method") else "right")
    for name, fam in result["families"].items():
        agree = {r["setting"]: r for r in fam["fidelity"]}
        times = {r["method"]: r for r in fam["step_times"]}
        for m in methods:
            s, t = fam["summary"][m], times[m]
            a = agree[_AGREEMENT_OF.get(m, m)]
            table.add_row(name, m, f"{a['top1_agreement']:.1%}", f"{a['output_rel_error']:.3f}",
                          f"{s['mean']:.2%}", f"{s['std']:.2%}", _pp(s["vs_plain"]),
                          f"{t['median_s'] * 1e3:.0f}", f"{t['vs_plain']:.2f}",
                          f"{t['vs_timm_ckpt']:.2f}")
    console().print(table)


def run_family(args: argparse.Namespace, family: Family, data: Digits, folder: Path
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every measurement of one family; returns its summary and its fine-tuning runs."""
    out = console()
    started = time.perf_counter()
    path = folder / f"{family.name}_{family.arch}_digits04.pth"
    out.print(f"[{family.name}] pre-training {family.arch} on digits 0-4 "
              f"({len(data.pre_y)} images)...")
    pre = pretrain(args, family, data, path)
    out.print(f"  {pre['seconds']:.0f} s, test accuracy {pre['test_accuracy']:.2%}, "
              f"median branch ratio {pre['branch_ratio']:.2f}; saved to {path}")
    fid = fidelity(family, data, path)
    for r in fid:
        out.print(f"  {r['setting']:<32} agreement {r['top1_agreement']:.1%}, "
                  f"output error {r['output_rel_error']:.3f}")
    out.print(f"[{family.name}] fine-tuning on digits 5-9, {args.seeds} seeds x "
              f"{len(args.methods)} methods...")
    runs = finetune(args, family, data, path)
    out.print(f"[{family.name}] step times and saved bytes...")
    times = step_times(args, family, data, path)
    memory = saved_bytes(args, family)
    summary = dict(
        arch=family.arch, describe=family.describe(), arch_kwargs=family.arch_kwargs,
        optimizer=family.optimizer, weight_decay=family.weight_decay, lr=args.lr or family.lr,
        steps=args.steps or family.steps, pretrain=pre, fidelity=fid,
        summary=summarise(runs, args.methods, args.steps or family.steps),
        step_times=times, saved_bytes=memory, seconds=time.perf_counter() - started,
    )
    return summary, runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", type=parse_list, default=list(FAMILIES),
                        help=f"comma-separated, from {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed, ..., first-seed + seeds - 1")
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps (default: the family's, 150 or 300)")
    parser.add_argument("--batch", type=int, default=32, help="fine-tuning batch")
    parser.add_argument("--lr", type=float, default=None,
                        help="fine-tuning learning rate (default: the family's)")
    parser.add_argument("--train-per-class", type=int, default=20,
                        help="fine-tuning images per class (0: the whole pool)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="default: the family's (300)")
    parser.add_argument("--pretrain-batch", type=int, default=64)
    parser.add_argument("--pretrain-lr", type=float, default=None,
                        help="default: the family's")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--timm-init", action="store_true",
                        help="pre-train from timm's default initialisation (see module doc)")
    parser.add_argument("--methods", type=parse_list, default=list(DEFAULT_METHODS),
                        help=f"from {', '.join(METHODS)}; plain and timm-ckpt are required")
    parser.add_argument("--time-warmup", type=int, default=2)
    parser.add_argument("--time-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--checkpoint-dir", help="where to save the pretrained weights "
                        "(default: a temporary folder)")
    parser.add_argument("--out", default=str(_ROOT / "docs" / "finetune"),
                        help="writes OUT.md and OUT.png")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--render", metavar="JSON",
                        help="only rewrite OUT.md and OUT.png from a JSON file of an earlier run")
    parser.add_argument("--note", action="append", default=None,
                        help="with --render: a paragraph for the Notes section (repeatable; "
                             "replaces the JSON's notes and is saved in it)")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, Path(args.out), args.note)
        return
    unknown = set(args.methods) - set(METHODS)
    if unknown or not {"plain", "timm-ckpt"} <= set(args.methods):
        parser.error(f"--methods: need plain and timm-ckpt, from {METHODS}; got {args.methods}")
    if set(args.families) - set(FAMILIES):
        parser.error(f"--families: from {list(FAMILIES)}; got {args.families}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = _source_version()  # now: revify may change on disk while this runs
    data = load_data(_SIZE)
    families: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.checkpoint_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.families:
            families[name], family_runs = run_family(args, FAMILIES[name], data, folder)
            runs += family_runs
    result = dict(
        argv=" ".join(sys.argv[1:] if argv is None else argv), args=vars(args),
        environment=environment(), couplings=dict(default=DEFAULT, revnet=REVNET),
        families=families,
        sizes=dict(pre_train=len(data.pre_y), pre_test=len(data.pre_test_y),
                   ft_pool=len(data.ft_pool_y), ft_test=len(data.ft_test_y)),
        seconds=time.perf_counter() - started, revify_source=source,
    )
    display(result)
    write_docs(result, runs, Path(args.out))
    console().print(f"wrote {args.out}.md and {args.out}.png ({result['seconds'] / 60:.1f} min)")
    if args.json:
        write_json(args.json, [dict(r, curve=[list(p) for p in r["curve"]]) for r in runs],
                   benchmark="finetune", **{k: v for k, v in result.items() if k != "environment"})


def _source_version() -> str:
    """The git commit of the revify checkout, with ``+changes`` if revify/ has local edits."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "revify") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_docs(result: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> None:
    """``OUT.md`` (tables) and ``OUT.png`` (learning curves)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, runs, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result, out.with_suffix(".png").name))


def render(path: str, out: Path, notes: list[str] | None = None) -> None:
    """Rewrite the docs from the JSON that ``--json`` saved; ``notes`` replace its notes and are
    written back to it."""
    payload = json.loads(Path(path).read_text())
    if notes is not None:
        payload["notes"] = notes
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    runs = payload.pop("results")
    payload.pop("benchmark", None)
    write_docs(payload, runs, out)


if __name__ == "__main__":
    main()
