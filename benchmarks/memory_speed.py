"""Peak memory and step time of plain training, timm checkpointing and revify, side by side.

Every row is one (device, precision, model, method, batch) training step, with ratios against
plain training and against timm's ``set_grad_checkpointing(True)`` measured in the same run.
Methods: ``plain``, ``timm-ckpt`` (one ``torch.utils.checkpoint`` per residual block, which for
these timm models is what wrapping each block in ``torch.utils.checkpoint`` by hand gives),
``revify`` (defaults: the faithful coupling) and ``revify-revnet`` (``coupling="revnet"``).

CPU (``--cpu``): the peak of live tensor bytes during one training step after a warm-up step,
from the allocation events of ``torch.profiler`` (``profile_memory=True``). It is the CPU
counterpart of ``torch.cuda.max_memory_allocated``: exact and repeatable, unlike the process RSS,
which follows glibc's caching (``peak_rss.py``). Gradients exist before the measured step, so the
figure is what activations and the backward's working set cost. fp32 rows also give the step
peak that ``revify.audit`` simulates on fake tensors for the same step ("audit MiB"; for plain,
the audit's "before").

Simulated (``--simulate``): the same training step run on fake tensors (``revify._simulate``,
what ``revify.audit`` uses), counting live tensor bytes, at CUDA's batch (64) and precisions
without allocating: the estimate of the CUDA rows where no GPU is at hand. It sees no kernel
workspace (cuDNN) nor allocator rounding; timm's CUDA figures in DESIGN.md §4 are within 5 %.
Beside each simulated row, the shared GPU time model (``../shared/tools/gpu_time_model.py``,
beside the checkout, or ``--time-model PATH``; ``benchmarks/_time_model.py`` calls it) predicts
the step time on an H100 ("model ms", with its ratios to plain and timm-ckpt and the host-device
synchronisations it counted), fitted on real H100 rows to about 15 % on ratios.

CUDA (when available): ``step_time.measure_cuda``: channels_last, SGD with momentum, fp32 (TF32)
and bf16 autocast, ``max_memory_allocated`` above the weights+grads+optimizer baseline and the
median step time from CUDA events. ``--budget-s`` stops starting new rows after that many
seconds; the JSON is rewritten after every row, so a run cut short keeps what it measured.

Run::

    .venv/bin/python benchmarks/memory_speed.py --cpu --models resnet50,resnet152 --no-cuda
    .venv/bin/python benchmarks/memory_speed.py --simulate --no-cuda    # fake tensors, batch 64
    python benchmarks/memory_speed.py --models resnet50,resnet152 --json cuda.json   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from _common import REVNET_METHOD, build_model, console, mib, parse_list, ratio, write_json
from _time_model import find_tool, predict
from rich.table import Table
from step_time import _AMP, _batch, measure_cuda

import revify
from revify._simulate import LiveBytes, fake_model
from revify.check import _peak_live_bytes

METHODS = ("plain", "timm-ckpt", "revify", REVNET_METHOD)


def cpu_peak_live_bytes(
    name: str, method: str, precision: str, batch: int, size: int
) -> dict[str, Any]:
    """Peak live tensor bytes of one CPU training step above what was live before it."""
    model = build_model(name, method, size=size)
    x, target = _batch(batch, size, "cpu", channels_last=False)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        F.cross_entropy(logits.float(), target).backward()

    step()  # warm-up: the gradients now exist
    peak = _peak_live_bytes(step)
    row = dict(device="cpu", precision=precision, model=name, method=method, batch=batch,
               size=size, peak_above_baseline_bytes=peak)
    if precision == "fp32" and method != "timm-ckpt":
        # What revify.audit simulates for the same step (plain: the original model's peak).
        report = revify.audit(model, x)
        row["audit_step_peak_bytes"] = (
            report.step_peak_before if method == "plain" else report.step_peak_after
        )
    return row


def simulated_peak(
    name: str, method: str, precision: str, batch: int, size: int
) -> dict[str, Any]:
    """Peak live tensor bytes of one training step on fake tensors, gradients allocated: the
    CUDA step, so revify takes the path it takes there (its fused stream ops, NOTE [ Fused
    streams ] in revify/_fused.py) unless REVIFY_FUSED_STREAMS says otherwise."""
    before = os.environ.get("REVIFY_FUSED_STREAMS")
    os.environ["REVIFY_FUSED_STREAMS"] = before or "1"
    try:
        model = build_model(name, method, size=size)
        live = LiveBytes()
        with fake_model(model):
            x, target = _batch(batch, size, "cpu", channels_last=False)
            with live:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), target)
                del logits
                loss.backward()
    finally:
        if before is None:
            del os.environ["REVIFY_FUSED_STREAMS"]
    return dict(device="fake", precision=precision, model=name, method=method, batch=batch,
                size=size, peak_above_baseline_bytes=live.peak)


def add_prediction(row: dict[str, Any], tool: Any) -> None:
    """The time model's step time for a simulated row (``modelled_s``, ``modelled_syncs``)."""
    got = predict(tool, row["model"], row["method"], row["precision"], row["batch"],
                  row["size"])
    if got is not None:
        row["modelled_s"] = got["step_s"]
        row["modelled_host_s"], row["modelled_device_s"] = got["host_s"], got["device_s"]
        row["modelled_syncs"] = sum(got.get("syncs", {}).values())


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Memory and time ratios against plain and timm-ckpt, same device, precision, model, batch."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["device"], r["precision"], r["model"], r["batch"]

    by = {(key(r), r["method"]): r for r in rows}
    for r in rows:
        for base in ("plain", "timm-ckpt"):
            other = by.get((key(r), base))
            suffix = base.replace("-", "_")
            for field, short in (("peak_above_baseline_bytes", "mem"), ("median_s", "time"),
                                 ("modelled_s", "model")):
                if other is not None and field in r and field in other:
                    r[f"{short}_vs_{suffix}"] = ratio(r[field], other[field])


def display(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Peak memory above the weights+grads+optimizer baseline, and step time")
    cols = ("device", "precision", "model", "batch", "method", "act MiB", "audit MiB",
            "MiB/sample",
            "mem ÷ plain", "mem ÷ timm", "ms/step", "time ÷ plain", "time ÷ timm",
            "model ms", "model ÷ plain", "model ÷ timm", "syncs")
    for col in cols:
        left = col in ("device", "precision", "model", "method")
        table.add_column(col, justify="left" if left else "right")

    def cell(r: dict[str, Any], field: str, fmt: str) -> str:
        return format(r[field], fmt) if field in r else "-"

    for r in rows:
        mem = r.get("peak_above_baseline_bytes")
        table.add_row(
            r["device"], r["precision"], r["model"], str(r["batch"]), r["method"],
            "-" if mem is None else f"{mib(mem):.0f}",
            "-" if "audit_step_peak_bytes" not in r else f"{mib(r['audit_step_peak_bytes']):.0f}",
            "-" if mem is None else f"{mib(mem) / r['batch']:.1f}",
            cell(r, "mem_vs_plain", ".2f"), cell(r, "mem_vs_timm_ckpt", ".2f"),
            "-" if "median_s" not in r else f"{r['median_s'] * 1e3:.1f}",
            cell(r, "time_vs_plain", ".2f"), cell(r, "time_vs_timm_ckpt", ".2f"),
            "-" if "modelled_s" not in r else f"{r['modelled_s'] * 1e3:.1f}",
            cell(r, "model_vs_plain", ".2f"), cell(r, "model_vs_timm_ckpt", ".2f"),
            cell(r, "modelled_syncs", "d"),
        )
    console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=parse_list, default=["resnet50", "resnet152"])
    parser.add_argument("--methods", type=parse_list, default=list(METHODS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--cpu", action="store_true", help="measure CPU peak live bytes")
    parser.add_argument("--cpu-batch", type=int, default=8)
    parser.add_argument("--simulate", action="store_true",
                        help="simulate the step on fake tensors at --sim-batch")
    parser.add_argument("--sim-batch", type=int, default=64)
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even if present")
    parser.add_argument("--precisions", type=parse_list, default=list(_AMP))
    parser.add_argument("--cuda-batches", type=parse_list, default=["64"])
    parser.add_argument("--cuda-warmup", type=int, default=3)
    parser.add_argument("--cuda-steps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new row after this many seconds")
    parser.add_argument("--json", help="write the results to this JSON file (after every row)")
    parser.add_argument("--time-model", help="the shared GPU time model's script (default: "
                        "../shared/tools/gpu_time_model.py beside the checkout)")
    parser.add_argument("--no-time-model", action="store_true",
                        help="no time-model prediction beside the simulated rows")
    args = parser.parse_args(argv)
    tool = None if args.no_time_model else find_tool(args.time_model)
    if args.simulate and tool is None and not args.no_time_model:
        console().print("time model not found: simulated rows get no step-time prediction")

    jobs: list[tuple[str, Any]] = []
    if args.cpu:
        jobs += [("cpu", (m, meth, p)) for p in args.precisions for m in args.models
                 for meth in args.methods]
    if args.simulate:
        jobs += [("fake", (m, meth, p)) for p in args.precisions for m in args.models
                 for meth in args.methods]
    if torch.cuda.is_available() and not args.no_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        jobs += [("cuda", (m, meth, p, int(b))) for b in args.cuda_batches
                 for p in args.precisions for m in args.models for meth in args.methods]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for device, job in jobs:
        if time.perf_counter() - start > args.budget_s:
            console().print(f"budget spent, skipped: {device} {job}")
            continue
        try:
            if device == "cpu":
                row = cpu_peak_live_bytes(*job, batch=args.cpu_batch, size=args.size)
            elif device == "fake":
                row = simulated_peak(*job, batch=args.sim_batch, size=args.size)
                if tool is not None:
                    add_prediction(row, tool)
            else:
                name, method, precision, batch = job
                row = measure_cuda(name, method, precision, batch, args.size, args.cuda_warmup,
                                   args.cuda_steps)
        except Exception:  # noqa: BLE001 - one failing configuration must not lose the others
            console().print(f"[red]failed: {device} {job}[/red]\n{traceback.format_exc()}")
            continue
        finally:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        console().print(f"{time.perf_counter() - start:6.0f}s {device} {job}: "
                        f"{mib(row['peak_above_baseline_bytes']):.0f} MiB"
                        + (f", {row['median_s'] * 1e3:.1f} ms" if "median_s" in row else "")
                        + (f", modelled {row['modelled_s'] * 1e3:.1f} ms" if "modelled_s" in row
                           else ""))
        if args.json:
            add_ratios(rows)
            write_json(args.json, rows, benchmark="memory_speed")
    if rows:
        add_ratios(rows)
        display(rows)


if __name__ == "__main__":
    main()
