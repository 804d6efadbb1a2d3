"""Which models revify converts, what it leaves alone and why, memory saved, gradient fidelity.

For each model (timm, ``pretrained=False``, built locally; plus a few torchvision models):

1. **Conversion** of the model as its library builds it (default arguments): traced or not
   (with the exact error), identity residuals found / converted, stages and units, transitions
   checkpointed, and every ``plan.report`` line of kind ``"unchanged"`` with its reason.
2. **Bytes saved for backward** by one train-mode forward at 224x224 (or the model's fixed input
   size), batch 2, before and after conversion. Counted as in ``saved_bytes.py`` (distinct
   storages through ``saved_tensors_hooks``, references kept during the pass, parameter storages
   left out) but on fake tensors: the model runs under ``FakeTensorMode`` through
   ``torch.func.functional_call`` with a fake copy of every parameter and buffer, so nothing of
   the activations' size is allocated and the real BatchNorm buffers do not change. "Before" is
   measured on the unconverted model, before ``convert``.
3. **Float64 gradient check** on a separately built copy with non-zero residual branches
   (``zero_init_last=False`` where the constructor takes it, else norm weights and layer-scale
   gains re-randomised; all-zero weight matrices such as torchvision's ViT head are
   re-randomised too, or every trunk gradient would be 0), ``drop_path_rate=0.1`` where
   accepted, BatchNorm in train mode, batch 2: 64 px for CNNs (32 for the widest), the fixed
   size for ViT/Mixer-like models, and a smaller ``img_size`` for the base-size transformers,
   CaiT and Swin (``Spec.grad_kwargs``) to keep the run short. It converts that copy and
   compares revify's gradients (all parameters and the input) with those of the same converted
   model under ``revify.plain_autograd()``, same RNG seed: pass when the largest per-tensor
   relative error (the floor rule of ``tests/conftest.py::max_rel_err``) is at most 1e-8. A
   failure also reports how far plain float64 gradients move under a 1e-14 input perturbation,
   to tell an ill-conditioned function from a wrong backward. Models not converted at the survey
   size are not checked.

4. **Output error at conversion** of the default coupling (``_common.DEFAULT``: the faithful
   ``alpha=63/64, beta=1/64, exact=True`` that issue 12 makes ``convert``'s default) and, beside
   it, of the RevNet coupling ``alpha=0, beta=1``: ``||f_converted(x) - f(x)|| / ||f(x)||`` in
   eval mode on a fixed random input, float32, against the unconverted model with the same
   weights. The weights are those of the gradient-check copy (random, with non-zero residual
   branches: ``zero_init_last=False`` or re-randomised norms and layer-scale gains, as above),
   at the gradient check's input size; BatchNorm uses its initial running statistics (mean 0,
   variance 1). With random weights this is a stress test of the coupling, not a statement
   about a particular checkpoint: ``docs/finetune.md`` measures pretrained ones.

Also recorded: buffers that ``convert`` itself changed (a copy is compared before and after).

Limits: tensors an autograd Function keeps as ``ctx`` attributes are invisible to the hooks
(DESIGN.md §4); ``plan.report`` has one line per module unit, so a block holding two residuals
(ViT, Swin) counts once in "identity residuals".

Run (about 10-15 minutes on 2 cores for the full list)::

    .venv/bin/python benchmarks/coverage.py                    # all models -> docs/coverage.md
    .venv/bin/python benchmarks/coverage.py --models resnet50,vit_tiny_patch16_224 \\
        --no-grad-check --no-output-error --out /tmp/coverage.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import math
import re
import statistics
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from _common import (
    DEFAULT,
    REVNET,
    SavedBytes,
    console,
    environment,
    mib,
    parse_list,
    ratio,
    write_json,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

import revify
from revify.check import _branch_ratios

_TV = "torchvision/"  # prefix of torchvision model names in --models
_TOL = 1e-8
_BATCH = 2


@dataclass(frozen=True)
class Spec:
    """One model of the survey.

    Args:
        name: timm name, or ``torchvision/<name>``.
        family: label for the table.
        grad_size: input size of the float64 check; ``None``: the model's fixed size if it has
            one, else 64 (at 32 px a RegNet's last stage is 1x1, BatchNorm normalises 2 values per
            channel and plain float64 gradients themselves move by 2e-5 under a 1e-14 input
            perturbation: too ill-conditioned for a 1e-8 comparison).
        grad_kwargs: extra constructor arguments for the gradient-check copy only (a smaller
            ``img_size`` for base-size transformers, to keep the check fast).
    """

    name: str
    family: str
    grad_size: int | None = None
    grad_kwargs: tuple[tuple[str, Any], ...] = ()


MODELS: tuple[Spec, ...] = (
    # ResNet v1 family: post-add ReLU units, projection transitions.
    Spec("resnet18", "ResNet"),
    Spec("resnet34", "ResNet"),
    Spec("resnet50", "ResNet"),
    Spec("resnet152", "ResNet", grad_size=32),
    Spec("resnext50_32x4d", "ResNeXt"),
    Spec("seresnet50", "SE-ResNet"),
    Spec("resnet50d", "ResNet-D"),
    Spec("wide_resnet50_2", "Wide ResNet", grad_size=32),
    Spec("skresnet18", "SK-ResNet"),
    Spec("ecaresnet26t", "ECA-ResNet"),
    # Pre-activation and normalizer-free.
    Spec("resnetv2_50", "ResNetV2"),
    Spec("nf_resnet26", "NF-ResNet"),
    Spec("nf_regnet_b0", "NF-RegNet"),
    # RegNet and other ByobNet-style CNNs.
    Spec("regnetx_002", "RegNetX"),
    Spec("regnety_002", "RegNetY"),
    Spec("regnetz_005", "RegNetZ"),
    Spec("gernet_s", "GENet (ByobNet)"),
    Spec("repvgg_a0", "RepVGG (ByobNet)"),
    Spec("mobileone_s0", "MobileOne (ByobNet)"),
    # ConvNeXt.
    Spec("convnext_atto", "ConvNeXt"),
    Spec("convnext_nano", "ConvNeXt"),
    Spec("convnext_tiny", "ConvNeXt"),
    Spec("convnextv2_atto", "ConvNeXt V2"),
    # Plain transformers (fixed input size).
    Spec("vit_tiny_patch16_224", "ViT"),
    Spec("vit_small_patch16_224", "ViT"),
    Spec("vit_base_patch16_224", "ViT", grad_kwargs=(("img_size", 112),)),
    Spec("deit_tiny_patch16_224", "DeiT"),
    Spec("deit_tiny_distilled_patch16_224", "DeiT"),
    Spec("eva02_tiny_patch14_224", "EVA-02"),
    Spec("cait_xxs24_224", "CaiT", grad_kwargs=(("img_size", 112),)),
    Spec("xcit_nano_12_p16_224", "XCiT"),
    Spec("pit_ti_224", "PiT"),
    # Hierarchical transformers and hybrids.
    Spec("swin_tiny_patch4_window7_224", "Swin",
         grad_kwargs=(("img_size", 128), ("window_size", 4))),
    Spec("twins_svt_small", "Twins"),
    Spec("coat_lite_tiny", "CoaT"),
    Spec("levit_128s", "LeViT"),
    Spec("tiny_vit_5m_224", "TinyViT"),
    Spec("mobilevit_xxs", "MobileViT"),
    Spec("efficientformer_l1", "EfficientFormer"),
    Spec("edgenext_xx_small", "EdgeNeXt"),
    Spec("fastvit_t8", "FastViT"),
    # MLP-like.
    Spec("mixer_s16_224", "MLP-Mixer"),
    Spec("resmlp_12_224", "ResMLP"),
    Spec("poolformer_s12", "PoolFormer"),
    # Inverted residual (MBConv) networks.
    Spec("efficientnet_b0", "EfficientNet"),
    Spec("mobilenetv2_100", "MobileNetV2"),
    Spec("mobilenetv3_small_100", "MobileNetV3"),
    Spec("mobilenetv3_large_100", "MobileNetV3"),
    Spec("ghostnet_100", "GhostNet"),
    # Other residual topologies.
    Spec("cspresnet50", "CSPResNet"),
    Spec("cspdarknet53", "CSPDarkNet"),
    Spec("res2net50_26w_4s", "Res2Net"),
    Spec("dla34", "DLA"),
    Spec("dpn68", "DPN"),
    Spec("hrnet_w18_small", "HRNet"),
    # No identity residual expected.
    Spec("vgg11", "VGG"),
    Spec("densenet121", "DenseNet"),
    Spec("rexnet_100", "ReXNet"),
    Spec("inception_v3", "Inception", grad_size=96),
    # torchvision.
    Spec(_TV + "resnet50", "ResNet (torchvision)"),
    Spec(_TV + "convnext_tiny", "ConvNeXt (torchvision)"),
    Spec(_TV + "vit_b_16", "ViT (torchvision)", grad_kwargs=(("image_size", 112),)),
)


@dataclass
class GradResult:
    """Outcome of the float64 gradient check of one model."""

    status: str  # "pass", "fail", "error", "not converted", "skipped"
    max_rel_err: float | None = None
    size: int | None = None
    detail: str = ""
    notes: list[str] = field(default_factory=list)
    min_branch_ratio: float | None = None  # smallest ||R(h)|| / ||h|| over the units
    median_branch_ratio: float | None = None
    outputs_equal: bool | None = None
    units: int | None = None  # units of the gradient-check copy (may differ: DropPath)


@dataclass
class OutputError:
    """Relative output error at conversion (eval mode) of the default and RevNet couplings."""

    status: str  # "ok", "error", "not converted", "skipped"
    default: float | None = None
    revnet: float | None = None
    default_calibrated: float | None = None  # BatchNorm statistics calibrated (BN models only)
    revnet_calibrated: float | None = None
    size: int | None = None
    detail: str = ""


@dataclass
class Row:
    """Everything recorded for one model."""

    model: str
    family: str
    size: int = 224
    traced: bool = False
    error: str = ""  # exception of build / convert / measurement
    converted: bool = False
    why_not: str = ""  # why nothing was converted
    identity_found: int = 0
    identity_converted: int = 0
    stages: int = 0
    units: int = 0
    transitions: int = 0  # segments between stages
    transitions_checkpointed: int = 0
    stem_checkpointed: bool = False
    unchanged: list[tuple[str, str]] = field(default_factory=list)
    bytes_before: int | None = None
    bytes_after: int | None = None
    grad: GradResult | None = None
    output_error: OutputError | None = None
    side_effects: str = ""  # model buffers that conversion changed
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# Building models


def _is_torchvision(name: str) -> bool:
    return name.startswith(_TV)


def _create(name: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    if _is_torchvision(name):
        return torchvision.models.get_model(name.removeprefix(_TV), weights=None, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def _input_size(model: nn.Module) -> tuple[int, bool]:
    """(side, fixed): the model's fixed input size if it has one, else 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return int(cfg["input_size"][-1]), True
    image_size = getattr(model, "image_size", None)  # torchvision ViT
    if isinstance(image_size, int):
        return image_size, True
    return 224, False


def _build_for_grad(spec: Spec) -> tuple[nn.Module, list[str]]:
    """The gradient-check copy: non-zero residual branches, DropPath where accepted."""
    extra = dict(spec.grad_kwargs)
    notes = [f"{k}={v}" for k, v in extra.items()]
    if _is_torchvision(spec.name):
        # torchvision: zero_init_residual=False is the default (ConvNeXt: stochastic depth 0.1).
        model, zero_init = _create(spec.name, **extra), False
    else:
        # (constructor arguments, whether zero_init_last=False was accepted)
        attempts = (
            ({"zero_init_last": False, "drop_path_rate": 0.1}, True),
            ({"drop_path_rate": 0.1}, False),
            ({"zero_init_last": False}, True),
            ({}, False),
        )
        preset = False  # the model's own factory passes zero_init_last=False (regnetz)
        for kwargs, nonzero in attempts:
            try:
                model = _create(spec.name, **kwargs, **extra)
            except TypeError as e:
                preset = preset or "multiple values for keyword argument 'zero_init_last'" in str(e)
                if "unexpected keyword" not in str(e) and "multiple values" not in str(e):
                    raise
                continue
            zero_init = not (nonzero or preset)
            notes += [f"{k}={v}" for k, v in kwargs.items()]
            break
    if zero_init or _is_torchvision(spec.name):
        n = _rerandomise_norms(model)
        if n:
            notes.append(f"{n} norm/scale weights re-randomised")
    n = _rerandomise_zero_weights(model)
    if n:
        notes.append(f"{n} all-zero weights re-randomised")
    return model, notes


_GAIN_NAMES = (
    "gamma", "gamma_1", "gamma_2", "ls1", "ls2", "layer_scale", "skipinit_gain", "scale", "gain",
)


def _rerandomise_norms(model: nn.Module) -> int:
    """Norm weights in [0.5, 1.5], biases ~0.1*N(0,1), layer-scale gains in [0.5, 1.0].

    Layer-scale gains are found by name, by owner class (``LayerScale``) or as a constant
    tensor of tiny non-zero values (``init_values=1e-5``, whatever the attribute is called).
    """
    gen = torch.Generator().manual_seed(1)
    count = 0
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norms) and getattr(module, "weight", None) is not None:
                w = module.weight
                w.copy_(torch.rand(w.shape, generator=gen) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
                count += 1
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            flat = p.detach().flatten()
            tiny_constant = bool(flat.numel() > 1 and (flat == flat[0]).all()
                                 and 0 < flat[0].abs() < 1e-3)
            owner = type(_owner(model, name)).__name__
            if leaf in _GAIN_NAMES or "LayerScale" in owner or tiny_constant:
                p.copy_(0.5 * torch.rand(p.shape, generator=gen) + 0.5)
                count += 1
    return count


def _rerandomise_zero_weights(model: nn.Module) -> int:
    gen = torch.Generator().manual_seed(2)
    count = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
                count += 1
    return count


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    prefix = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return model.get_submodule(prefix)


# ----------------------------------------------------------------------------------------------
# Conversion and its report


def _convert(model: nn.Module, example: Tensor) -> tuple[bool, str]:
    """Convert in place; ``(converted, warning text when nothing was converted)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        revify.convert(model, example)
    if revify.stages(model):
        return True, ""
    texts = [str(w.message) for w in caught if "revify.convert" in str(w.message)]
    return False, texts[0] if texts else "convert returned the model unchanged (no warning)"


def _unconverted_report(model: nn.Module, example: Tensor) -> list[Any]:
    """The report the pass computed for a model it left unchanged (``convert`` keeps no plan
    then). Uses the private ``_build_plan``; empty if that is unavailable."""
    try:
        module = importlib.import_module("revify._plan")
        plan = module._build_plan(model, (example,), dict(
            alpha=0.0, beta=1.0, checkpoint_stem=True, checkpoint_transitions=True, min_units=1))
        return list(plan.report)
    except Exception:
        return []


def _fill_from_plan(row: Row, model: nn.Module, report: list[Any]) -> None:
    identity = [r for r in report if r.detail.startswith("identity residual")]
    row.identity_found = len(identity)
    row.identity_converted = sum(r.kind == "reversible" for r in identity)
    stages = revify.stages(model)
    row.stages = len(stages)
    row.units = sum(len(s.units) for s in stages)
    plan = model.__dict__.get("_revify_plan")
    segments = list(plan.segments) if plan is not None else []
    between = [s for s in segments if s.name not in ("stem", "tail")]
    row.transitions = len(between)
    row.transitions_checkpointed = sum(bool(s.checkpoint) for s in between)
    row.stem_checkpointed = any(s.name == "stem" and s.checkpoint for s in segments)
    row.unchanged = [(r.name, r.detail) for r in report if r.kind == "unchanged"]


# ----------------------------------------------------------------------------------------------
# Bytes saved for backward, on fake tensors


def saved_bytes(model: nn.Module, side: int) -> int:
    """Distinct non-parameter storage bytes saved for backward by one train-mode forward of a
    (2, 3, side, side) batch, on fake tensors; the model's own tensors are not touched."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    state: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        state[name] = fake_mode.from_tensor(p).requires_grad_(p.requires_grad)
    for name, b in model.named_buffers():
        state[name] = fake_mode.from_tensor(b)
    counter = SavedBytes([*state.values(), *model.parameters(), *model.buffers()])
    training = {m: m.training for m in model.modules()}
    model.train()
    try:
        with (
            torch.random.fork_rng(devices=[]),
            fake_mode,
            torch.enable_grad(),
            counter,
        ):
            x = torch.empty(_BATCH, 3, side, side)
            out = torch.func.functional_call(model, state, (x,))
        del out
    finally:
        for m, t in training.items():
            m.training = t
    return counter.total


# ----------------------------------------------------------------------------------------------
# Float64 gradient check


def step_grads(model: nn.Module, x: Tensor, plain: bool, seed: int = 1):
    """Output and gradients (parameters, then input) of a fixed projection of the output, with
    buffers restored afterwards and the RNG seeded (as ``tests/conftest.py::step_grads``)."""
    state = {k: v.detach().clone() for k, v in model.named_buffers()}
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    with revify.plain_autograd() if plain else contextlib.nullcontext():
        y = model(x)
    if isinstance(y, (tuple, list)):  # e.g. distilled heads in train mode
        y = torch.cat([t.flatten() for t in y])
    w = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).view_as(y)
    grads = torch.autograd.grad((y * w).sum(), [*params, x], allow_unused=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(state[k])
    return y.detach(), grads


def max_rel_err(a, b) -> float:
    """Largest per-tensor ``||a - b|| / ||b||``, norms floored at 1e-4 of the largest gradient
    norm (the rule of ``tests/conftest.py::max_rel_err``). ``inf`` if the None patterns differ."""
    floor = 1e-4 * max(y.norm().item() for y in b if y is not None)
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if (x is None) != (y is None):
            return math.inf
        if x is None:
            continue
        worst = max(worst, (x - y).norm().item() / max(y.norm().item(), floor))
    return worst


def _check_side(spec: Spec, model: nn.Module) -> int:
    """Input side of the gradient check (and of the output-error measurement)."""
    side, fixed = _input_size(model)
    extra = dict(spec.grad_kwargs)
    side = extra.get("img_size") or extra.get("image_size") or (side if fixed else None)
    return side or spec.grad_size or 64


def grad_check(spec: Spec) -> GradResult:
    model, notes = _build_for_grad(spec)
    model = model.double().train()
    side = _check_side(spec, model)
    res = GradResult("error", size=side, notes=notes)
    converted, why = _convert(model, torch.zeros(_BATCH, 3, side, side, dtype=torch.float64))
    if not converted:
        res.status, res.detail = "not converted", why
        return res
    res.units = sum(len(s.units) for s in revify.stages(model))
    x = torch.randn(_BATCH, 3, side, side, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    with _branch_ratios(model) as ratios:  # the reference pass also measures the branches
        y_ref, g_ref = step_grads(model, x, plain=True)
    if ratios:  # a unit whose samples DropPath all dropped has R(h) = 0: look at the median
        res.min_branch_ratio, res.median_branch_ratio = min(ratios), statistics.median(ratios)
    y_rev, g_rev = step_grads(model, x, plain=False)
    res.outputs_equal = torch.equal(y_ref, y_rev)
    res.max_rel_err = max_rel_err(g_rev, g_ref)
    res.status = "pass" if res.max_rel_err <= _TOL else "fail"
    if res.status == "fail":
        # Is the function itself this sensitive? Plain float64 gradients under a 1e-14
        # relative input perturbation: comparable to the error -> ill-conditioned, no bug.
        _, g_eps = step_grads(model, x * (1 + 1e-14), plain=True)
        res.detail = (f"plain float64 gradients move by {max_rel_err(g_eps, g_ref):.1e} under a "
                      "1e-14 relative input perturbation")
    if not res.outputs_equal:
        res.notes.append("outputs differ")
    if res.median_branch_ratio is not None and res.median_branch_ratio < 1e-3:
        res.notes.append("residual branches are ~0: check is weak")
    return res


# ----------------------------------------------------------------------------------------------
# Output error at conversion


def _logits(y: Any) -> Tensor:
    return torch.cat([t.flatten() for t in y]) if isinstance(y, (tuple, list)) else y


def _calibrate_batchnorm(model: nn.Module, side: int, batches: int = 4) -> bool:
    """Replace BatchNorm running statistics by their average over ``batches`` train-mode
    forwards of random (8, 3, side, side) inputs, as training would leave them; returns whether
    the model has BatchNorm."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    gen = torch.Generator().manual_seed(5)
    training = {m: m.training for m in model.modules()}
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for _ in range(batches):
                model(torch.randn(8, 3, side, side, generator=gen))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, t in training.items():
            m.training = t
    return True


def _rel_error(model: nn.Module, original: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        y = _logits(model.eval()(x)).double()
        y0 = _logits(original.eval()(x)).double()
    return float((y - y0).norm() / y0.norm().clamp_min(1e-300))


def output_error(spec: Spec) -> OutputError:
    """``||f_converted(x) - f(x)|| / ||f(x)||`` of the default and the RevNet coupling, eval mode,
    float32, on the gradient-check weights (non-zero residual branches) and a fixed input; for
    models with BatchNorm also after calibrating its running statistics (the same buffers
    loaded into both models)."""
    original, _ = _build_for_grad(spec)
    original.train()  # converted as users convert: a model in train mode
    side = _check_side(spec, original)
    res = OutputError("error", size=side)
    x = torch.randn(_BATCH, 3, side, side, generator=torch.Generator().manual_seed(4))
    couplings = {"default": DEFAULT, "revnet": REVNET}
    models = {}
    for name, options in couplings.items():
        model = copy.deepcopy(original)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            revify.convert(model, torch.zeros(_BATCH, 3, side, side), **options)
        if not revify.stages(model):
            res.status, res.detail = "not converted", f"not converted at {side} px"
            return res
        models[name] = model
    res.default = _rel_error(models["default"], original, x)
    res.revnet = _rel_error(models["revnet"], original, x)
    if _calibrate_batchnorm(original, side):
        for model in models.values():
            model.load_state_dict(original.state_dict())
        res.default_calibrated = _rel_error(models["default"], original, x)
        res.revnet_calibrated = _rel_error(models["revnet"], original, x)
    values = (res.default, res.revnet, res.default_calibrated, res.revnet_calibrated)
    if not all(math.isfinite(v) for v in values if v is not None):
        res.detail = "non-finite output"
    res.status = "ok"
    return res


# ----------------------------------------------------------------------------------------------
# One model


def _changed(model: nn.Module, before: dict[str, Tensor]) -> list[str]:
    return [k for k, v in model.named_buffers() if k in before and not v.equal(before[k])]


def _exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def survey(spec: Spec, grad: bool, out_error: bool = True) -> Row:
    row = Row(spec.name, spec.family)
    start = time.perf_counter()
    try:
        model = _create(spec.name).train()
        row.size, _ = _input_size(model)
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        row.bytes_before = saved_bytes(model, row.size)
        if _changed(model, buffers):  # would be a bug of this script
            raise RuntimeError(f"saved_bytes changed buffers {_changed(model, buffers)[:3]}")
        example = torch.zeros(_BATCH, 3, row.size, row.size)
        ran = False
        try:
            row.converted, row.why_not = _convert(model, example)
            ran = True
        except revify.ConversionError as e:
            row.error = _exc(e)
            row.why_not = row.error
        # convert falls back to submodules when the trunk does not trace, and warns if none
        # converts: the model was not traced then.
        row.traced = ran and (row.converted or "cannot trace" not in row.why_not)
        if ran and not row.traced:
            row.error = row.why_not
        changed = _changed(model, buffers)
        if changed:
            row.side_effects = f"{len(changed)} buffers changed by convert, e.g. {changed[0]}"
        if ran:
            plan = model.__dict__.get("_revify_plan")
            if plan is not None:
                report = plan.report
            elif "it has no residual adds" in row.why_not or not row.traced:
                report = []  # nothing to list (and re-running the pass is slow on DenseNet)
            else:
                report = _unconverted_report(model, example)
            _fill_from_plan(row, model, report)
            buffers = {k: v.clone() for k, v in model.named_buffers()}
            row.bytes_after = saved_bytes(model, row.size) if row.converted else row.bytes_before
        if _changed(model, buffers):
            raise RuntimeError(f"saved_bytes changed buffers {_changed(model, buffers)[:3]}")
        del model
    except Exception as e:  # a survey records failures rather than stopping
        row.error = row.error or _exc(e)
        row.why_not = row.why_not or row.error
        traceback.print_exc()
    if grad and not row.converted:
        row.grad = GradResult("not converted", detail="not converted at the survey size")
    elif grad:
        try:
            row.grad = grad_check(spec)
        except Exception as e:
            row.grad = GradResult("error", detail=_exc(e))
            traceback.print_exc()
    else:
        row.grad = GradResult("skipped")
    if not out_error:
        row.output_error = OutputError("skipped")
    elif not row.converted:
        row.output_error = OutputError("not converted")
    else:
        try:
            row.output_error = output_error(spec)
        except Exception as e:
            row.output_error = OutputError("error", detail=_exc(e))
            traceback.print_exc()
    row.seconds = time.perf_counter() - start
    return row


# ----------------------------------------------------------------------------------------------
# Markdown


def _coupling(options: dict[str, Any]) -> str:
    if not options:
        return "revify.convert(model)"
    text = {0.0: "0", 1.0: "1", 63 / 64: "63/64", 1 / 64: "1/64"}
    return ", ".join(f"{k}={text.get(v, v) if isinstance(v, float) else v}"
                     for k, v in options.items())


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _reason_key(detail: str) -> str:
    """Group report reasons: drop shapes and node names that differ between blocks."""
    return re.sub(r"\(\d+(, \d+)*\)", "(…)", detail)


def _grouped_unchanged(row: Row) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for name, detail in row.unchanged:
        groups.setdefault(_reason_key(detail), []).append(name)
    return list(groups.items())


def _names(names: list[str], limit: int = 4) -> str:
    uniq = list(dict.fromkeys(names))
    more = f", … ({len(uniq)} in all)" if len(uniq) > limit else ""
    return ", ".join(f"`{n}`" for n in uniq[:limit]) + more


def _grad_cell(g: GradResult | None) -> str:
    if g is None:
        return "—"
    if g.status in ("pass", "fail"):
        return f"{g.status} ({g.max_rel_err:.1e}, {g.size}px)"
    return g.status


def _error_cell(e: OutputError | None) -> str:
    if e is None or e.status == "skipped":
        return "—"
    if e.status != "ok":
        return e.status
    return f"{e.default:.1e} / {e.revnet:.2f}"


def _output_error_summary(rows: list[Row]) -> str:
    measured = [r.output_error for r in rows
                if r.output_error is not None and r.output_error.status == "ok"]
    if not measured:
        return ""
    default = sorted(e.default for e in measured)
    revnet = sorted(e.revnet for e in measured)
    within = sum(e <= 0.05 for e in default)
    text = (f" Output error at conversion (eval mode, random weights with live residual "
            f"branches) on {len(measured)} models: default coupling median "
            f"{statistics.median(default):.1e}, largest {default[-1]:.1e} ({within} of "
            f"{len(measured)} ≤ 5 %); RevNet coupling median {statistics.median(revnet):.2f}, "
            f"largest {revnet[-1]:.2f}.")
    calibrated = sorted(e.default_calibrated for e in measured
                        if e.default_calibrated is not None)
    if calibrated:
        text += (f" With BatchNorm statistics calibrated ({len(calibrated)} BN models), the "
                 f"default's median is {statistics.median(calibrated):.1e}, largest "
                 f"{calibrated[-1]:.1e} ({sum(e <= 0.05 for e in calibrated)} ≤ 5 %).")
    return text


def _output_error_section(rows: list[Row]) -> list[str]:
    measured = [r for r in rows if r.output_error is not None and r.output_error.status == "ok"]
    if not measured:
        return []
    lines = [
        "", "## Output error at conversion", "",
        "`||f_converted(x) - f(x)|| / ||f(x)||` right after `revify.convert`, eval mode, "
        "float32, batch 2 of a fixed N(0, 1) input at the given size, against the unconverted "
        "model with the same weights: *default* is "
        f"`{_coupling(DEFAULT)}` (the coming default of `revify.convert`, issue 12), *revnet* "
        f"`{_coupling(REVNET)}`. Weights: the gradient-check copy's, random with non-zero "
        "residual branches (`zero_init_last=False`, or norm weights and layer-scale gains "
        "re-randomised; see the set-up table above). *Initial BN statistics*: BatchNorm "
        "normalises with its initial running mean 0 and variance 1, so in deep networks the "
        "stream grows from unit to unit. *BN calibrated* (models with BatchNorm only): running "
        "statistics replaced by the average over 4 train-mode forwards of random batches of 8 "
        "(loaded into both models), so every unit's input is normalised as in a trained "
        "network and random branches are about as large as the stream: the hardest case for a "
        "coupling that stays close to the original by a margin of `beta = 1/64` per unit. "
        "Random weights make this a stress test; pretrained checkpoints: "
        "[finetune.md](finetune.md). ‖R(h)‖/‖h‖ is the gradient check's median (train mode).",
        "",
        "| model | size | default, initial BN statistics | revnet, initial BN statistics | "
        "default, BN calibrated | revnet, BN calibrated | ‖R(h)‖/‖h‖ median |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def cell(v: float | None, digits: str) -> str:
        return "—" if v is None else format(v, digits)

    for r in measured:
        e, g = r.output_error, r.grad
        ratio_text = (f"{g.median_branch_ratio:.2g}" if g is not None
                      and g.median_branch_ratio is not None else "—")
        lines.append(
            f"| `{r.model}` | {e.size} | {cell(e.default, '.1e')} | {cell(e.revnet, '.2f')} | "
            f"{cell(e.default_calibrated, '.1e')} | {cell(e.revnet_calibrated, '.2f')} | "
            f"{ratio_text} |")
    return lines


def _short(text: str, n: int = 60) -> str:
    text = text.splitlines()[0] if text else ""
    return text if len(text) <= n else text[: n - 1] + "…"


def to_markdown(rows: list[Row], grad: bool, seconds: float) -> str:
    env = environment()
    n = len(rows)
    traced = sum(r.traced for r in rows)
    converted = sum(r.converted for r in rows)
    checked = [r for r in rows if r.grad is not None and r.grad.status in ("pass", "fail")]
    passing = sum(r.grad.status == "pass" for r in checked)
    before = sum(r.bytes_before for r in rows if r.converted and r.bytes_before)
    after = sum(r.bytes_after for r in rows if r.converted and r.bytes_after)
    lines = [
        "# Model coverage",
        "",
        f"Generated by `benchmarks/coverage.py` (torch {env['torch']}, timm {env['timm']}, "
        f"torchvision {torchvision.__version__}, revify {env['revify']}, CPU, "
        f"{seconds / 60:.1f} min).",
        "",
        f"**{n} models: {traced} traced, {converted} converted"
        + (f", float64 gradient check passing on {passing} of {len(checked)} checked"
           if grad else ", gradient check not run")
        + f".** Over the converted models, bytes saved for backward went from "
        f"{mib(before):.0f} MiB to {mib(after):.0f} MiB ({ratio(after, before):.2f}×)."
        + _output_error_summary(rows),
        "",
        "Columns: *identity residuals* are `plan.report` lines saying \"identity residual\" "
        "(converted / found; one line per module unit, so a ViT or Swin block with two "
        "residual adds counts once); *stages* / *units* from `revify.stages(model)`; "
        "*transitions* are the segments between stages (checkpointed / all) and *stem* whether "
        "the layers before the first stage are checkpointed; *saved* is what one train-mode "
        f"forward at batch {_BATCH} and the given size saves for backward (fake tensors, "
        "distinct non-parameter storages), before → after conversion; *grad check* is the "
        "largest per-tensor relative error of revify's float64 gradients (parameters and "
        "input) against the same converted model under `revify.plain_autograd()`, at batch "
        f"{_BATCH} and the given size, pass ≤ {_TOL:g}. *Output error* is "
        "`||f_converted(x) - f(x)|| / ||f(x)||` right after conversion, eval mode, float32, a "
        "fixed random input at the gradient check's size, for the default coupling "
        f"(`{_coupling(DEFAULT)}`, the coming default of `revify.convert`, issue 12) / the "
        f"RevNet coupling (`{_coupling(REVNET)}`); weights are random with non-zero residual "
        "branches (the gradient-check copy: `zero_init_last=False`, or norm weights and "
        "layer-scale gains re-randomised, listed in the set-up table below; BatchNorm at its "
        "initial running statistics), so this stresses the coupling rather than measuring a "
        "checkpoint (pretrained ones: [finetune.md](finetune.md)). *Left alone* counts "
        "`plan.report` lines of kind \"unchanged\" (listed below).",
        "",
        "| model | family | size | traced | identity residuals | stages | units | transitions "
        "| stem | saved MiB before → after | ratio | grad check | output error default / "
        "revnet | left alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.bytes_before is not None and r.bytes_after is not None:
            saved = f"{mib(r.bytes_before):.1f} → {mib(r.bytes_after):.1f}"
            rat = f"{ratio(r.bytes_after, r.bytes_before):.2f}"
        else:
            saved = rat = "—"
        traced = "yes" if r.traced else f"**no**: {_md(_short(r.error))}"
        lines.append(
            f"| `{r.model}` | {r.family} | {r.size} | {traced} | "
            f"{r.identity_converted} / {r.identity_found} | {r.stages} | {r.units} | "
            f"{r.transitions_checkpointed} / {r.transitions} | "
            f"{'ckpt' if r.stem_checkpointed else '—'} | {saved} | {rat} | "
            f"{_grad_cell(r.grad)} | {_error_cell(r.output_error)} | {len(r.unchanged)} |"
        )

    lines += ["", "## Not converted", ""]
    missing = [r for r in rows if not r.converted]
    if not missing:
        lines.append("Every model was converted.")
    for r in missing:
        lines.append(f"- `{r.model}` ({r.family}): {_md(r.why_not or r.error)}")

    errors = [r for r in rows if r.error and r.converted]
    failed = [r for r in rows if r.grad is not None and r.grad.status in ("fail", "error")]
    lines += ["", "## Gradient check failures and errors", ""]
    if not failed and not errors:
        lines.append("None." if grad else "Gradient check not run.")
    for r in errors:
        lines.append(f"- `{r.model}`: {_md(r.error)}")
    for r in failed:
        g = r.grad
        err = f"max relative error {g.max_rel_err:.3e}" if g.max_rel_err is not None else ""
        lines.append(f"- `{r.model}`: {g.status} {err} {_md(g.detail)}".rstrip())
    for r in rows:
        e = r.output_error
        if e is not None and (e.status == "error" or e.detail):
            lines.append(f"- `{r.model}`: output error {e.status}: {_md(e.detail)}")

    odd = [r for r in rows if r.converted and r.units != r.identity_converted]
    lines += ["", "## Report lines vs. units", ""]
    lines.append(
        "Converted models whose count of \"reversible\" identity-residual report lines differs "
        "from the number of units in `revify.stages(model)` (a module unit with several "
        "residuals has one line; several inline units of one module share a line):"
        if odd else "Every unit has its report line."
    )
    for r in odd:
        lines.append(f"- `{r.model}`: {r.units} units, {r.identity_converted} reversible lines")

    touched = [r for r in rows if r.side_effects]
    lines += ["", "## State changed by `revify.convert`", ""]
    lines.append(
        "Buffers of the model that differ after `convert` (compared with a copy taken before it; "
        "the fake-tensor counting is checked to change nothing):" if touched else "None."
    )
    for r in touched:
        lines.append(f"- `{r.model}`: {_md(r.side_effects)}")

    lines += ["", "## Gradient check set-up per model", "",
              "| model | size | constructor / re-initialisation | units | ‖R(h)‖/‖h‖ min, median "
              "| outputs equal | notes |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r.grad
        if g is None or g.status == "skipped":
            continue
        setup = [n for n in g.notes if "differ" not in n and "weak" not in n]
        flags = [n for n in g.notes if n not in setup]
        if g.units is not None and g.units != r.units:
            flags.append(f"coverage build has {r.units} units")
        if g.status == "not converted":
            flags.append(_short(g.detail, 80))
        ratio_text = (f"{g.min_branch_ratio:.2g}, {g.median_branch_ratio:.2g}"
                      if g.min_branch_ratio is not None else "—")
        eq = {True: "yes", False: "**no**", None: "—"}[g.outputs_equal]
        lines.append(
            f"| `{r.model}` | {g.size or '—'} | {_md(', '.join(setup)) or 'defaults'} | "
            f"{g.units if g.units is not None else '—'} | {ratio_text} | {eq} | "
            f"{_md('; '.join(flags))} |"
        )

    lines += _output_error_section(rows)
    lines += ["", "## Left alone (plan.report lines of kind \"unchanged\")", ""]
    for r in rows:
        groups = _grouped_unchanged(r)
        if not groups:
            continue
        lines.append(f"- `{r.model}`:")
        for reason, names in groups:
            lines.append(f"  - {_md(reason)} — {len(names)}×: {_names(names)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Main


def _spec(name: str) -> Spec:
    for s in MODELS:
        if s.name == name:
            return s
    return Spec(name, "torchvision" if _is_torchvision(name) else "—")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=parse_list, default=None,
                        help="comma-separated names (timm, or torchvision/<name>); "
                             "default: the built-in list")
    parser.add_argument("--no-grad-check", dest="grad", action="store_false",
                        help="skip the float64 gradient checks")
    parser.add_argument("--no-output-error", dest="output_error", action="store_false",
                        help="skip the output error at conversion")
    parser.add_argument("--out", default="docs/coverage.md", help="markdown output")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the models are small and, on "
                             "a shared machine, more threads wait on each other: 5x slower "
                             "float64 steps measured with 2 threads on 2 busy cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [_spec(n) for n in args.models] if args.models else list(MODELS)

    rows: list[Row] = []
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console()) as progress:
        task = progress.add_task("coverage", total=len(specs))
        for spec in specs:
            progress.update(task, description=f"{spec.name:<34}")
            row = survey(spec, args.grad, args.output_error)
            rows.append(row)
            g = row.grad.status if row.grad else "-"
            progress.console.print(
                f"{spec.name:<34} traced={row.traced!s:<5} converted={row.converted!s:<5} "
                f"units={row.units:<3} grad={g:<13} out err={_error_cell(row.output_error):<15} "
                f"{row.seconds:5.1f}s"
                + (f"  [{_short(row.error, 70)}]" if row.error else ""),
                markup=False,
            )
            progress.advance(task)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(rows, args.grad, seconds))
    console().print(f"wrote {out} ({len(rows)} models, {seconds / 60:.1f} min)")
    if args.json:
        write_json(args.json, [asdict(r) for r in rows], benchmark="coverage")


if __name__ == "__main__":
    main()
