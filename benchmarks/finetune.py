"""Fine-tuning a locally pretrained timm ResNet: does revify keep what the pretrained weights know?

Protocol (everything offline, on CPU, scikit-learn's 8x8 handwritten digits):

1. **Pre-train** a timm ResNet on digits 0-4 (images upscaled to 32 px, 3 channels, random
   shifts of up to 3 px) and save its ``state_dict`` to a file.
2. **Load** it the way users load local pretrained weights::

       timm.create_model(arch, pretrained=True, num_classes=5,
                         pretrained_cfg_overlay=dict(file=path, num_classes=5))

   ``file`` makes timm read the file (it takes precedence over the URL and Hugging Face hub
   sources of the registry's config, so nothing is downloaded). ``num_classes=5`` in the overlay
   tells timm how many classes the *checkpoint* has: timm compares the model's ``num_classes``
   with ``pretrained_cfg['num_classes']`` (1000 for ``resnet34``) and, when they differ, drops
   the checkpoint's classifier and loads the rest non-strictly, which would leave the 5-class
   head we trained randomly initialised without an error. The script checks that every loaded
   tensor equals the file's.
3. **Convert** and measure the **top-1 agreement** with the pretrained model on the digits 0-4
   test images through the pretrained 5-class head, before any fine-tuning.
4. **Fine-tune** on digits 5-9 (a new, seeded 5-class head: ``reset_classifier(5)``) with the
   same steps, optimizer, data order, augmentation and head initialisation for every method, over
   several seeds (each seed draws its own training subset, order and head):

   - ``plain``: ordinary autograd;
   - ``timm-ckpt``: timm's ``set_grad_checkpointing(True)``;
   - ``revify``: ``revify.convert(model, x)`` (``alpha=0, beta=1``);
   - ``faithful+schedule``: ``convert(..., alpha=63/64, beta=1/64, exact=True)`` with a
     ``revify.Schedule`` that holds the faithful coupling for the first third of the steps,
     moves to ``alpha=0, beta=1`` over the second third and trains the last third there;
   - ``faithful``: the same conversion, coefficients kept for the whole run.

5. **Memory**: bytes saved for backward by one training forward at 224x224, batch 2, for each
   method on the architecture trained here and on the standard-width ``resnet34`` (random
   weights), counted with ``saved_bytes.count_saved_bytes`` (saved-tensor hooks, one count per
   storage, parameters left out). timm is switched to re-entrant checkpointing for that count
   only, so that the inputs its checkpoints keep go through the hooks (see ``saved_bytes.py``).
6. **Time**: median training-step time of each method on the fine-tuning batch, all methods built
   in this process and their steps interleaved after warm-up (so that load drift on a shared
   machine hits them alike), with ratios to plain training and to timm checkpointing.

Why ``zero_init_last=False`` for pre-training (``--zero-init-last`` to change it): timm zeroes the
last norm of every residual branch at initialisation, and a few hundred steps on digits leave the
branches small (``|R(x)| / |x|`` about 0.1), so *every* coupling is then close to the original
network and the comparison says little about pretrained backbones, whose branches are live
(DESIGN.md §3). Both recipes are reported in ``docs/finetune.md``.

Threads: ``--threads 1`` by default. On a 2-core machine shared with other jobs, two OpenMP
threads made a step 4x slower than one (spinning threads waiting for a descheduled peer).

Writes ``docs/finetune.md`` (tables and machine), ``docs/finetune.png`` (learning curves) and,
with ``--json``, every number. The defaults take about 15 minutes on two CPU cores::

    .venv/bin/python benchmarks/finetune.py --json finetune.json
    .venv/bin/python benchmarks/finetune.py --seeds 1 --steps 20 --pretrain-steps 50  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import timm
import torch
import torch.nn.functional as F
from _common import console, environment, mib, ratio, write_json
from rich.table import Table
from saved_bytes import count_saved_bytes
from sklearn.datasets import load_digits
from torch import Tensor, nn

import revify

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the non-interactive backend)

_ROOT = Path(__file__).resolve().parent.parent
_FAITHFUL = dict(alpha=63 / 64, beta=1 / 64, exact=True)
METHODS: tuple[str, ...] = ("plain", "timm-ckpt", "revify", "faithful+schedule", "faithful")
# Extra conversions whose agreement with the pretrained model is reported (no fine-tuning).
_AGREEMENT_ONLY = {
    "exact alpha=0, beta=1 (schedule end)": dict(alpha=0.0, beta=1.0, exact=True),
    "exact alpha=1, beta=1/64": dict(alpha=1.0, beta=1 / 64, exact=True),
    "exact alpha=15/16, beta=1/16": dict(alpha=15 / 16, beta=1 / 16, exact=True),
}
_SHIFT = 3  # random shifts of up to 3 px at 32 px (under one pixel of the 8x8 original)


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
def model_kwargs(width: int, zero_init_last: bool) -> dict[str, Any]:
    """timm kwargs of the architecture: ResNet stage widths ``width * (1, 2, 4, 8)``."""
    return dict(channels=tuple(width * 2**i for i in range(4)), zero_init_last=zero_init_last)


def load_pretrained(arch: str, path: Path, width: int, num_classes: int = 5) -> nn.Module:
    """The user's path: timm reads ``path`` through ``pretrained_cfg_overlay`` (see module doc).

    Raises:
        RuntimeError: a tensor of the built model differs from the file's (the file was not
            what got loaded, e.g. timm dropped the classifier).
    """
    model = timm.create_model(
        arch, pretrained=True, num_classes=num_classes,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes),
        **model_kwargs(width, zero_init_last=True),  # init is overwritten by the file
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


def prepare(model: nn.Module, method: str, example: Tensor) -> nn.Module:
    """Set ``model`` (pretrained, train mode) up for ``method``, in place."""
    if method == "timm-ckpt":
        model.set_grad_checkpointing(True)
    elif method == "revify":
        revify.convert(model, example, strict=True)
    elif method.startswith("faithful"):
        revify.convert(model, example, strict=True, **_FAITHFUL)
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
def make_optimizer(model: nn.Module, lr: float, steps: int) -> tuple[Any, Any]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
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
) -> list[float]:
    """SGD (momentum, cosine learning rate) on random shifted mini-batches; returns the losses.

    The batches and shifts come from a generator seeded with ``seed``, so every method sees the
    same data in the same order. ``on_step(i)`` runs after step ``i`` (and with ``i = 0``
    before the first step).
    """
    optimizer, lr_schedule = make_optimizer(model, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    if on_step:
        on_step(0)
    for i in range(1, steps + 1):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
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


def pretrain(args: argparse.Namespace, data: Digits, path: Path) -> dict[str, Any]:
    """Train on digits 0-4 from scratch and save the ``state_dict`` to ``path``."""
    torch.manual_seed(args.pretrain_seed)
    model = timm.create_model(args.arch, pretrained=False, num_classes=5,
                              **model_kwargs(args.width, args.zero_init_last))
    start = time.perf_counter()
    losses = train(model, data.pre_x, data.pre_y, steps=args.pretrain_steps,
                   batch=args.pretrain_batch, lr=args.pretrain_lr, seed=args.pretrain_seed,
                   background=data.background)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), path)
    return dict(steps=args.pretrain_steps, seconds=seconds, final_loss=losses[-1],
                test_accuracy=accuracy(model, data.pre_test_x, data.pre_test_y),
                branch_ratio=branch_ratio(model, data.pre_test_x))


@torch.no_grad()
def branch_ratio(model: nn.Module, x: Tensor) -> float:
    """Median over identity units of ``||U(h) - h|| / ||h||`` (eval mode): how live the
    residual branches are (0 for timm's initialisation with ``zero_init_last=True``)."""
    ratios: list[float] = []

    def hook(block: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        if block.downsample is None:  # identity units only (the ones revify couples)
            h = inputs[0]
            ratios.append(float((out - h).norm() / h.norm()))

    blocks = [m for m in model.modules() if isinstance(m, timm.models.resnet.BasicBlock)]
    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        predict(model, x)
    finally:
        for h in handles:
            h.remove()
    return statistics.median(ratios) if ratios else float("nan")


def fidelity(args: argparse.Namespace, data: Digits, path: Path) -> list[dict[str, Any]]:
    """Agreement with the pretrained model right after conversion, digits 0-4 test images."""
    reference = predict(load_pretrained(args.arch, path, args.width), data.pre_test_x)
    example = data.pre_x[:2]
    settings: dict[str, dict[str, Any] | None] = {
        "plain": None, "timm-ckpt": None, "revify": {}, "faithful": dict(_FAITHFUL),
        **_AGREEMENT_ONLY,
    }
    rows = []
    for name, convert_kwargs in settings.items():
        model = load_pretrained(args.arch, path, args.width)
        if name == "timm-ckpt":
            model.set_grad_checkpointing(True)
        row: dict[str, Any] = dict(setting=name)
        if convert_kwargs is not None:
            revify.convert(model, example, strict=True, **convert_kwargs)
            report = revify.check(model, data.pre_test_x, gradients=False)
            row.update(output_rel_error=report.output_rel_error,
                       check_top1_agreement=report.top1_agreement)
        logits = predict(model, data.pre_test_x)
        row["top1_agreement"] = float((logits.argmax(1) == reference.argmax(1)).double().mean())
        row["output_rel_error"] = float((logits - reference).norm() / reference.norm())
        row["accuracy_0_4"] = float((logits.argmax(1) == data.pre_test_y).double().mean())
        rows.append(row)
    return rows


def finetune(args: argparse.Namespace, data: Digits, path: Path) -> list[dict[str, Any]]:
    """One run per seed and method; the curves are test accuracy every ``--eval-every`` steps."""
    runs = []
    for seed in range(args.seeds):
        x, y = subset(data.ft_pool_x, data.ft_pool_y, args.train_per_class, seed)
        for method in args.methods:
            model = prepare(load_pretrained(args.arch, path, args.width), method, x[:2])
            torch.manual_seed(seed)  # the same new head for every method
            model.reset_classifier(5)
            schedule = schedule_for(model, method, args.steps)
            curve: list[tuple[int, float]] = []

            def evaluate(i: int, model: nn.Module = model, curve: list = curve) -> None:
                if i % args.eval_every == 0 or i == args.steps:
                    curve.append((i, accuracy(model, data.ft_test_x, data.ft_test_y)))

            start = time.perf_counter()
            losses = train(model, x, y, steps=args.steps, batch=args.batch, lr=args.lr,
                           seed=1000 + seed, background=data.background, on_step=evaluate,
                           schedule=schedule)
            seconds = time.perf_counter() - start
            errors = [st.last_reconstruction_error for st in revify.stages(model)]
            runs.append(dict(
                method=method, seed=seed, train_images=len(y), losses=losses, curve=curve,
                test_accuracy=curve[-1][1], seconds=seconds,
                final_coefficients=schedule.coefficients() if schedule else None,
                max_reconstruction_error=max((float(e) for e in errors if e is not None),
                                             default=None),
            ))
            console().print(f"  seed {seed} {method:<18} test accuracy {curve[-1][1]:.2%} "
                            f"({seconds:.0f} s)")
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


def saved_bytes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Bytes saved for backward at 224x224, batch 2 (random weights: only shapes matter)."""
    architectures = {f"{args.arch} width {args.width} (trained here)":
                     model_kwargs(args.width, False),
                     f"{args.arch} (standard width)": dict(zero_init_last=False)}
    settings = {"plain": None, "timm-ckpt": None, "revify": {}, "faithful": _FAITHFUL,
                "exact alpha=0, beta=1 (schedule end)": _AGREEMENT_ONLY[
                    "exact alpha=0, beta=1 (schedule end)"]}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    target = torch.randint(0, 5, (2,), generator=gen)
    rows = []
    with _reentrant_timm_checkpoints():
        for label, kwargs in architectures.items():
            group = []
            for name, convert_kwargs in settings.items():
                torch.manual_seed(0)
                model = timm.create_model(args.arch, num_classes=5, **kwargs).train()
                if name == "timm-ckpt":
                    model.set_grad_checkpointing(True)
                elif convert_kwargs is not None:
                    revify.convert(model, x, strict=True, **convert_kwargs)
                n_bytes, n_saved = count_saved_bytes(model, x, target)
                group.append(dict(architecture=label, setting=name, bytes=n_bytes,
                                  saved_tensors=n_saved))
            by = {r["setting"]: r["bytes"] for r in group}
            for r in group:
                r["vs_plain"] = ratio(r["bytes"], by["plain"])
                r["vs_timm_ckpt"] = ratio(r["bytes"], by["timm-ckpt"])
            rows += group
    return rows


def step_times(args: argparse.Namespace, data: Digits, path: Path) -> list[dict[str, Any]]:
    """Median step time per method on one fixed fine-tuning batch, steps interleaved.

    ``faithful`` is timed at its coupling and ``faithful+schedule`` at the end of its
    schedule, ``alpha=0, beta=1`` (still with exact streams).
    """
    x, y = data.ft_pool_x[: args.batch], data.ft_pool_y[: args.batch]
    runs: dict[str, Callable[[], None]] = {}
    for method in args.methods:
        model = prepare(load_pretrained(args.arch, path, args.width), method, x[:2])
        if method == "faithful+schedule":  # `faithful` times the start: time the end here
            for st in revify.stages(model):
                st.alpha, st.beta = 0.0, 1.0
        optimizer, _ = make_optimizer(model, args.lr, 1)
        model.train()

        def step(model: nn.Module = model, optimizer: Any = optimizer) -> None:
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
    """Per method: final test accuracy (mean, std over seeds), wall time per run, and the
    lowest seed-mean test accuracy measured after the first third of the steps."""
    out = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        acc = [r["test_accuracy"] for r in mine]
        curve = torch.tensor([[a for i, a in r["curve"] if i >= steps // 3] for r in mine])
        out[m] = dict(mean=statistics.fmean(acc),
                      std=statistics.stdev(acc) if len(acc) > 1 else 0.0, n=len(acc),
                      seconds=statistics.fmean(r["seconds"] for r in mine),
                      lowest_after_third=float(curve.mean(0).min()))
    return out


def plot(runs: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    """Test accuracy (left) and training loss (right) against step, mean over seeds."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        steps = [s for s, _ in mine[0]["curve"]]
        accs = torch.tensor([[a for _, a in r["curve"]] for r in mine])
        ax_acc.plot(steps, accs.mean(0) * 100, marker=".", label=m)
        losses = torch.tensor([r["losses"] for r in mine]).mean(0)
        window = max(len(losses) // 20, 1)  # moving average over 5 % of the run
        smooth = losses.unfold(0, window, 1).mean(1)
        ax_loss.plot(range(window, len(losses) + 1), smooth, label=m)
    ax_acc.set(xlabel="fine-tuning step", ylabel="test accuracy, digits 5-9 (%)",
               title=f"Test accuracy, mean over {len(mine)} seeds")
    ax_loss.set(xlabel="fine-tuning step", ylabel="training loss (moving average)",
                yscale="log", title="Training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any], methods: list[str]) -> str:
    """``docs/finetune.md``."""
    args, env = result["args"], result["environment"]
    summary = result["summary"]
    agree = {r["setting"]: r for r in result["fidelity"]}
    times = {r["method"]: r for r in result["step_times"]}
    pre, sizes = result["pretrain"], result["sizes"]
    d = args.get("faithful_d", 16)
    fl = f"alpha={d - 1}/{d}, beta=1/{d}"  # the faithful coupling of this run
    bits = "4 bits" if d <= 16 else "1 byte"

    def agreement(method: str) -> str:
        r = agree.get("faithful" if method.startswith("faithful") else method)
        return f"{r['top1_agreement']:.1%}" if r else "-"

    lines = [
        "# Fine-tuning a pretrained backbone with revify",
        "",
        "Generated by `benchmarks/finetune.py` (see its docstring for the protocol). "
        f"Command: `.venv/bin/python benchmarks/finetune.py {result['argv']}`.",
        "",
        f"Pre-training: timm `{args['arch']}` at stage widths "
        f"{model_kwargs(args['width'], False)['channels']} "
        f"(layers 3, 4, 6, 3: reversible chains of 2, 3, 5 and 2 units), "
        f"`zero_init_last={args['zero_init_last']}`, on digits 0-4 "
        f"({sizes['pre_train']} images, 32 px, random shifts of up to {_SHIFT} px), "
        f"{pre['steps']} steps of batch {args['pretrain_batch']}, "
        f"{pre['seconds']:.0f} s: test accuracy {pre['test_accuracy']:.1%}, median "
        f"`|U(h) - h| / |h|` of the identity units {pre['branch_ratio']:.2f}. Loaded with "
        "`timm.create_model(arch, pretrained=True, num_classes=5, "
        "pretrained_cfg_overlay=dict(file=path, num_classes=5))`; every tensor checked equal to "
        "the file's (without `num_classes` in the overlay timm silently drops the 5-class head: "
        "it compares with the registry's 1000 classes).",
        "",
        f"Fine-tuning: digits 5-9, {args['train_per_class']} training images per class drawn "
        f"per seed, {sizes['ft_test']} test images, {args['steps']} steps of batch "
        f"{args['batch']}, SGD (momentum 0.9, Nesterov, weight decay 5e-4), cosine learning "
        f"rate from {args['lr']}, the same data order, shifts and new head for every method; "
        f"{args['seeds']} seeds.",
        "",
        f"`faithful+schedule` holds `{fl}` for the first third of the steps (the "
        "new head and the backbone adapt while the network still computes nearly the "
        "pretrained function), moves linearly in alpha and geometrically in beta (`beta = 1/d`, "
        "d rounded, as exact streams need) to `alpha=0, beta=1` over the second third, and "
        "trains the last third at the final coupling, so that the evaluated network is the one "
        f"the weights were last trained for. `faithful` keeps `{fl}` throughout: "
        "with exact streams its reconstruction is exact at any beta, so nothing forces the move.",
        "",
        "## Accuracy and fidelity",
        "",
        "| method | top-1 agreement with pretrained (0-4 test, before fine-tuning) | "
        f"test accuracy 5-9 (mean ± std) | lowest mean test accuracy after step "
        f"{args['steps'] // 3} | wall time per run (with evaluations) |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in methods:
        s = summary[m]
        lines.append(f"| {m} | {agreement(m)} | {s['mean']:.2%} ± {s['std']:.2%} | "
                     f"{s['lowest_after_third']:.1%} | {s['seconds']:.0f} s |")
    lines += [
        "",
        "Test accuracy is measured in eval mode, with BatchNorm's running statistics. These "
        "average the batch statistics of past steps (momentum 0.1), so while a schedule moves "
        "the coupling they describe an earlier network than the one evaluated.",
    ]
    lines += [
        "",
        "Right after conversion, through the pretrained head, on the digits 0-4 test images: "
        "top-1 agreement with a separately loaded original, the same from "
        "`revify.check(model, x, gradients=False)`, relative output (logit) error and accuracy:",
        "",
        "| setting | top-1 agreement | `revify.check` agreement | output rel. error | "
        "accuracy 0-4 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["fidelity"]:
        checked = r.get("check_top1_agreement")
        lines.append(f"| {r['setting']} | {r['top1_agreement']:.1%} | "
                     f"{'-' if checked is None else f'{checked:.1%}'} | "
                     f"{r['output_rel_error']:.3f} | {r['accuracy_0_4']:.1%} |")
    lines += [
        "",
        "![learning curves](finetune.png)",
        "",
        "## Memory and time",
        "",
        "Bytes saved for backward by one training forward at 224x224, batch 2 (saved-tensor "
        "hooks, one count per storage, parameters excluded; timm checkpoints re-entrant for the "
        f"count). `faithful` stores the remainders of the division by {d} ({bits} per element "
        "and unit) on top of the two streams.",
        "",
        "| architecture | setting | saved MiB | ÷ plain | ÷ timm-ckpt |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["saved_bytes"]:
        lines.append(f"| {r['architecture']} | {r['setting']} | {mib(r['bytes']):.1f} | "
                     f"{r['vs_plain']:.3f} | {r['vs_timm_ckpt']:.2f} |")
    batch = result["step_times"][0]["batch"]
    lines += [
        "",
        f"Training step on the fine-tuning batch ({batch} images, 32 px), methods interleaved "
        f"in one process, {args['time_warmup']} warm-up and {args['time_steps']} timed rounds; "
        f"ratios are medians of per-round ratios. `faithful` is timed at `{fl}`, "
        "`faithful+schedule` at the end of its schedule (`alpha=0, beta=1`, exact streams).",
        "",
        "| method | median ms | ÷ plain | ÷ timm-ckpt |",
        "|---|---:|---:|---:|",
    ]
    for m in methods:
        t = times[m]
        lines.append(f"| {m} | {t['median_s'] * 1e3:.0f} | {t['vs_plain']:.2f} | "
                     f"{t['vs_timm_ckpt']:.2f} |")
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
        "Total run time "
        f"{result['seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def display(result: dict[str, Any], methods: list[str]) -> None:
    table = Table(title="Fine-tuning on digits 5-9")
    for col in ("method", "agreement", "test acc", "± std", "step ms", "÷ plain", "÷ timm-ckpt"):
        table.add_column(col, justify="left" if col == "method" else "right")
    agree = {r["setting"]: r["top1_agreement"] for r in result["fidelity"]}
    times = {r["method"]: r for r in result["step_times"]}
    for m in methods:
        s, t = result["summary"][m], times[m]
        a = agree["faithful" if m.startswith("faithful") else m]
        table.add_row(m, f"{a:.1%}", f"{s['mean']:.2%}", f"{s['std']:.2%}",
                      f"{t['median_s'] * 1e3:.0f}", f"{t['vs_plain']:.2f}",
                      f"{t['vs_timm_ckpt']:.2f}")
    console().print(table)
    mem = Table(title="Saved for backward, 224x224, batch 2")
    for col in ("architecture", "setting", "MiB", "÷ plain", "÷ timm-ckpt"):
        mem.add_column(col, justify="left" if col in ("architecture", "setting") else "right")
    for r in result["saved_bytes"]:
        mem.add_row(r["architecture"], r["setting"], f"{mib(r['bytes']):.1f}",
                    f"{r['vs_plain']:.3f}", f"{r['vs_timm_ckpt']:.2f}")
    console().print(mem)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet34", help="a timm ResNet with BasicBlocks")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    parser.add_argument("--batch", type=int, default=32, help="fine-tuning batch")
    parser.add_argument("--lr", type=float, default=0.02, help="fine-tuning learning rate")
    parser.add_argument("--train-per-class", type=int, default=20,
                        help="fine-tuning images per class (0: the whole pool)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-batch", type=int, default=64)
    parser.add_argument("--pretrain-lr", type=float, default=0.05)
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--zero-init-last", action="store_true",
                        help="pre-train with timm's zero_init_last=True (see module doc)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--time-warmup", type=int, default=2)
    parser.add_argument("--time-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--faithful-d", type=int, default=64,
                        help="faithful coupling beta = 1/d, alpha = 1 - beta")
    parser.add_argument("--checkpoint", help="where to save the pretrained weights "
                        "(default: a temporary file)")
    parser.add_argument("--out", default=str(_ROOT / "docs" / "finetune"),
                        help="writes OUT.md and OUT.png")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--render", metavar="JSON",
                        help="only rewrite OUT.md and OUT.png from a JSON file of an earlier run")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, Path(args.out))
        return
    _FAITHFUL.update(alpha=1 - 1 / args.faithful_d, beta=1 / args.faithful_d)
    unknown = set(args.methods) - set(METHODS)
    if unknown or not {"plain", "timm-ckpt"} <= set(args.methods):
        parser.error(f"--methods: need plain and timm-ckpt, from {METHODS}; got {args.methods}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = _source_version()  # now: revify may change on disk while this runs
    out = console()

    data = load_data(32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint or Path(tmp) / f"{args.arch}_digits04.pth")
        out.print(f"pre-training {args.arch} on digits 0-4 ({len(data.pre_y)} images)...")
        pre = pretrain(args, data, path)
        out.print(f"  {pre['seconds']:.0f} s, test accuracy {pre['test_accuracy']:.2%}, "
                  f"median branch ratio {pre['branch_ratio']:.2f}; saved to {path}")
        out.print("agreement with the pretrained model after conversion...")
        fid = fidelity(args, data, path)
        for r in fid:
            out.print(f"  {r['setting']:<40} agreement {r['top1_agreement']:.1%}, "
                      f"output error {r['output_rel_error']:.3f}")
        out.print(f"fine-tuning on digits 5-9, {args.seeds} seeds x {len(args.methods)} methods...")
        runs = finetune(args, data, path)
        out.print("step times...")
        times = step_times(args, data, path)
    out.print("saved bytes at 224x224, batch 2...")
    memory = saved_bytes(args)

    result = dict(
        argv=" ".join(sys.argv[1:] if argv is None else argv),
        args=vars(args), environment=environment(), pretrain=pre, fidelity=fid,
        summary=summarise(runs, args.methods, args.steps), step_times=times, saved_bytes=memory,
        sizes=dict(pre_train=len(data.pre_y), pre_test=len(data.pre_test_y),
                   ft_pool=len(data.ft_pool_y), ft_test=len(data.ft_test_y)),
        seconds=time.perf_counter() - started, revify_source=source,
    )
    display(result, args.methods)
    write_docs(result, runs, Path(args.out))
    out.print(f"wrote {args.out}.md and {args.out}.png ({result['seconds'] / 60:.1f} min)")
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
    methods = result["args"]["methods"]
    plot(runs, methods, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result, methods))


def render(path: str, out: Path) -> None:
    """Rewrite the docs from the JSON that ``--json`` saved."""
    payload = json.loads(Path(path).read_text())
    runs = payload.pop("results")
    payload.pop("benchmark", None)
    write_docs(payload, runs, out)


if __name__ == "__main__":
    main()
