"""Gradient fidelity of revify against a float64 truth, relative to plain autograd (DESIGN.md §4).

Reversible backward rebuilds activations from the stage outputs, so its gradients carry the
rounding error of that reconstruction on top of the usual one. To separate the two, we compare
both revify and ordinary autograd of the *same converted function* (``revify.plain_autograd()``)
with a float64 reference and report

    err(g) = ||g - g64|| / ||g64||     (all parameter gradients concatenated)

and ``err(revify) / err(plain)``. A ratio near 1 means reversibility added no error: random-weight
deep nets with train-mode BatchNorm at tiny batch are ill-conditioned, and plain fp32 autograd is
itself several percent off float64 (bf16 autocast: over 100 %), so absolute errors mean little.

Set-up, identical for every run: one random-weight model (``zero_init_last=False``: timm's default
zeroes every residual branch, which would make every reconstruction exact and the test vacuous),
converted once; a float64 deep copy of it; one input batch and target; the initial state dict
(weights and BatchNorm running statistics) loaded again before each run, so that every run starts
from the same BatchNorm state. The float64 reference runs the converted model under
``revify.plain_autograd()``; revify in float64 must agree with it to about 1e-13.

Run::

    .venv/bin/python benchmarks/fidelity.py --models resnet50,resnet152 --json fidelity.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from _common import build_model, console, parse_list, write_json
from rich.table import Table
from torch import Tensor, nn

import revify

Grads = dict[str, Tensor]

_TARGET_RATIO = 2.0  # acceptance: revify at most twice as far from float64 as plain autograd


@contextlib.contextmanager
def _mode(plain: bool, bf16: bool) -> Iterator[None]:
    """Ordinary autograd (``plain``) or revify, optionally under CPU bf16 autocast."""
    with contextlib.ExitStack() as stack:
        if plain:
            stack.enter_context(revify.plain_autograd())
        if bf16:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        yield


def gradients(
    model: nn.Module,
    state: dict[str, Tensor],
    x: Tensor,
    target: Tensor,
    *,
    plain: bool,
    bf16: bool = False,
) -> tuple[Grads, float]:
    """Parameter gradients (as float64) of the cross-entropy of one training forward.

    The model is reset to ``state`` first (weights and BatchNorm running statistics), so runs do
    not see each other's statistics updates; the RNG is reseeded for the same reason.

    Args:
        model: converted model, train mode.
        state: state dict to load before the run (cast to the model's dtype on load).
        x: input (B, 3, H, W) in the model's dtype.
        target: class indices (B,).
        plain: run under ``revify.plain_autograd()`` instead of the reversible backward.
        bf16: run the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

    Returns:
        ``(grads, loss)`` with one float64 gradient per parameter name.
    """
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    for stage in revify.stages(model):  # so that a stale value cannot be reported for this run
        stage.last_reconstruction_error = None
    torch.manual_seed(0)
    with _mode(plain, bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.to(x.dtype), target)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            raise RuntimeError(f"fidelity: parameter {name} received no gradient")
        grads[name] = p.grad.detach().to(torch.float64).clone()
    return grads, loss.item()


def relative_errors(grads: Grads, ref: Grads) -> tuple[float, float]:
    """``(||g - ref|| / ||ref||`` over all parameters, median of the per-parameter ratios)."""
    num = den = 0.0
    per_param = []
    for name, r in ref.items():
        d2 = (grads[name] - r).pow(2).sum().item()
        r2 = r.pow(2).sum().item()
        num, den = num + d2, den + r2
        if r2 > 0:
            per_param.append(math.sqrt(d2 / r2))
    return math.sqrt(num / den), statistics.median(per_param)


def _reconstruction_error(model: nn.Module) -> float:
    """Largest ``last_reconstruction_error`` over the stages, set by the last revify backward."""
    errs = [s.last_reconstruction_error for s in revify.stages(model)]
    return max((float(e) for e in errs if e is not None), default=float("nan"))


def measure(name: str, batch: int, size: int, seed: int, exact: bool = False) -> dict[str, Any]:
    """All runs for one model; returns one result row."""
    options = {"exact": True} if exact else None  # only passed when asked: older revify lacks it
    model = build_model(name, "revify", size=size, seed=seed, convert_options=options,
                        zero_init_last=False)
    model64 = copy.deepcopy(model).to(torch.float64)
    state = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    target = torch.randint(0, model.num_classes, (batch,), generator=gen)

    ref, loss64 = gradients(model64, state, x.double(), target, plain=True)
    rev64, _ = gradients(model64, state, x.double(), target, plain=False)
    row: dict[str, Any] = dict(model=name, batch=batch, size=size, seed=seed, exact=exact,
                               loss_f64=loss64,
                               f64_agreement=relative_errors(rev64, ref)[0],
                               f64_reconstruction_error=_reconstruction_error(model64))
    del rev64
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        rev, loss_rev = gradients(model, state, x, target, plain=False, bf16=bf16)
        recon = _reconstruction_error(model)
        plain, loss_plain = gradients(model, state, x, target, plain=True, bf16=bf16)
        (err_rev, med_rev), (err_plain, med_plain) = (relative_errors(rev, ref),
                                                      relative_errors(plain, ref))
        row[precision] = dict(err_revify=err_rev, err_plain=err_plain,
                              revify_vs_plain=relative_errors(rev, plain)[0],
                              median_revify=med_rev, median_plain=med_plain,
                              ratio=err_rev / err_plain, loss_revify=loss_rev,
                              loss_plain=loss_plain, reconstruction_error=recon,
                              ok=err_rev / err_plain <= _TARGET_RATIO)
    return row


def display(rows: list[dict[str, Any]]) -> None:
    """One table row per model and precision."""
    b, s = rows[0]["batch"], rows[0]["size"]
    streams = ", exact streams" if rows[0]["exact"] else ""
    table = Table(title=f"Gradient error vs float64 truth, batch {b}, {s}x{s}, BN train mode"
                        f"{streams}")
    cols = ("model", "precision", "err revify", "err plain", "ratio", "median revify",
            "median plain", "revify vs plain", "recon. err", f"ratio <= {_TARGET_RATIO:g}")
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "precision") else "right")
    for r in rows:
        for precision in ("fp32", "bf16"):
            p = r[precision]
            table.add_row(r["model"], precision, f"{p['err_revify']:.3e}",
                          f"{p['err_plain']:.3e}", f"{p['ratio']:.4f}",
                          f"{p['median_revify']:.3e}", f"{p['median_plain']:.3e}",
                          f"{p['revify_vs_plain']:.2e}", f"{p['reconstruction_error']:.1e}",
                          "yes" if p["ok"] else "NO")
        table.add_row(r["model"], "fp64", "-", "0 (reference)", "-", "-", "-",
                      f"{r['f64_agreement']:.2e}", f"{r['f64_reconstruction_error']:.1e}", "-")
    console().print(table)
    console().print(
        "err = ||g - g64|| / ||g64|| over all parameters; median: per-parameter median.\n"
        "revify vs plain: ||g_revify - g_plain|| / ||g_plain|| at the same precision (fp64 row: "
        "the float64 agreement, expected ~1e-13).\n"
        "recon. err: largest stage last_reconstruction_error after the revify backward.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=parse_list, default=["resnet50", "resnet152"],
                        help="comma-separated timm model names")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact", action="store_true",
                        help="convert with revify.convert(..., exact=True) (fixed-point streams)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)

    rows = [measure(name, args.batch, args.size, args.seed, args.exact) for name in args.models]
    display(rows)
    if args.json:
        write_json(args.json, rows, benchmark="fidelity", target_ratio=_TARGET_RATIO)


if __name__ == "__main__":
    main()
