"""Training step time of plain, timm checkpointing and revify; on CUDA also peak memory.

CPU: the three methods are built once in this process and their steps are interleaved (one step
of each method in turn) after warm-up, so that clock or load drift hits all of them alike; we
report the median step time and its ratio to plain training and to timm's
``set_grad_checkpointing(True)``, both as a ratio of medians and "paired" (the median over rounds
of the ratio of steps that ran back to back, which is steadier on a machine shared with other
work).

CUDA (only when ``torch.cuda.is_available()``; skip with ``--no-cuda``): one method at a time,
channels_last, SGD with momentum, fp32 (TF32 matmuls and convolutions) and bf16 autocast. After
warm-up the gradients and momentum buffers exist and are kept (``zero_grad(set_to_none=False)``),
so ``torch.cuda.memory_allocated()`` then is the weights + grads + optimizer (+ input batch)
baseline; the reported memory is ``torch.cuda.max_memory_allocated()`` over the timed steps minus
that baseline, i.e. what activations and the backward's working set cost (DESIGN.md §4). Step
times there come from CUDA events around each step.

Run::

    .venv/bin/python benchmarks/step_time.py --models resnet50 --json step_time.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import METHODS, REVNET_METHOD, build_model, console, mib, parse_list, ratio, write_json
from rich.table import Table
from torch import Tensor, nn

_AMP = {"fp32": None, "bf16": torch.bfloat16}
_NUM_CLASSES = 1000  # timm's default ImageNet head


def make_step(
    model: nn.Module, x: Tensor, target: Tensor, amp_dtype: torch.dtype | None, momentum: float
) -> Callable[[], None]:
    """A closure running one forward + backward + SGD step on a fixed batch.

    Gradients are zeroed in place rather than freed, so that they stay allocated between steps
    and count in the memory baseline, not in the step's peak.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=momentum)
    device_type = x.device.type

    def step() -> None:
        amp = (contextlib.nullcontext() if amp_dtype is None
               else torch.autocast(device_type, dtype=amp_dtype))
        with amp:
            logits = model(x)
        F.cross_entropy(logits.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    return step


def interleaved_times(runs: dict[str, Callable[[], None]], warmup: int, steps: int
                      ) -> dict[str, list[float]]:
    """Seconds of each step closure, run in rounds (one step of every method per round) so
    that a change of machine load touches all methods alike; ``warmup`` rounds uncounted."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + steps):
        for k, step in runs.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def _batch(batch: int, size: int, device: str, channels_last: bool) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    target = torch.randint(0, _NUM_CLASSES, (batch,), generator=gen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device, memory_format=fmt), target.to(device)


def time_cpu(name: str, batch: int, size: int, warmup: int, steps: int) -> list[dict[str, Any]]:
    """Median CPU step time per method, steps interleaved across methods."""
    x, target = _batch(batch, size, "cpu", channels_last=False)
    methods = (*METHODS, REVNET_METHOD)  # the default (faithful) coupling and the RevNet one
    runs = {m: make_step(build_model(name, m, size=size), x, target, None, 0.9) for m in methods}
    times = interleaved_times(runs, warmup, steps)
    return [dict(device="cpu", precision="fp32", model=name, method=m, batch=batch, size=size,
                 threads=torch.get_num_threads(), median_s=statistics.median(ts), times_s=ts)
            for m, ts in times.items()]


def measure_cuda(
    name: str, method: str, precision: str, batch: int, size: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Median step time and peak memory above the weights+grads+optimizer baseline, on CUDA."""
    device = "cuda"
    model = build_model(name, method, size=size, device=device, channels_last=True)
    x, target = _batch(batch, size, device, channels_last=True)
    step = make_step(model, x, target, _AMP[precision], momentum=0.9)
    for _ in range(warmup):  # creates grads and momentum buffers, lets cuDNN pick algorithms
        step()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    times = [start.elapsed_time(end) / 1000 for start, end in events]
    del model, step, x, target
    gc.collect()  # a converted model refers to itself (its rewritten forward holds it)
    torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), precision=precision, model=name,
                method=method, batch=batch, size=size, median_s=statistics.median(times),
                times_s=times, baseline_bytes=baseline, peak_above_baseline_bytes=peak)


def time_cuda(name: str, batch: int, size: int, warmup: int, steps: int) -> list[dict[str, Any]]:
    """All methods and precisions on CUDA for one model, one model instance at a time."""
    # "fp32" on GPUs means TF32 tensor cores, as in DESIGN.md's reference table.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return [measure_cuda(name, m, p, batch, size, warmup, steps) for p in _AMP
            for m in (*METHODS, REVNET_METHOD)]


def _paired(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``times[i] / base[i]`` (steps ``i`` ran back to back)."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Time (and memory) ratios against plain and timm-ckpt of the same device/precision/model."""
    def key(r: dict[str, Any]) -> tuple[str, str, str]:
        return r["device"], r["precision"], r["model"]

    by = {(key(r), r["method"]): r for r in rows}
    for r in rows:
        plain, ckpt = by[(key(r), "plain")], by[(key(r), "timm-ckpt")]
        r["time_vs_plain"] = ratio(r["median_s"], plain["median_s"])
        r["time_vs_timm_ckpt"] = ratio(r["median_s"], ckpt["median_s"])
        revnet = by.get((key(r), REVNET_METHOD))
        if revnet is not None:
            r["time_vs_revnet"] = ratio(r["median_s"], revnet["median_s"])
        if r["device"] == "cpu":  # interleaved rounds: a paired ratio cancels load drift
            r["paired_vs_plain"] = _paired(r["times_s"], plain["times_s"])
            r["paired_vs_timm_ckpt"] = _paired(r["times_s"], ckpt["times_s"])
            if revnet is not None:
                r["paired_vs_revnet"] = _paired(r["times_s"], revnet["times_s"])
        if "peak_above_baseline_bytes" in r:
            mem = r["peak_above_baseline_bytes"]
            r["mem_vs_plain"] = ratio(mem, plain["peak_above_baseline_bytes"])
            r["mem_vs_timm_ckpt"] = ratio(mem, ckpt["peak_above_baseline_bytes"])


def display(rows: list[dict[str, Any]]) -> None:
    """One table per device: median step time, ratios, and (CUDA) peak memory."""
    for device in dict.fromkeys(r["device"] for r in rows):
        group = [r for r in rows if r["device"] == device]
        cuda = "peak_above_baseline_bytes" in group[0]
        b, s = group[0]["batch"], group[0]["size"]
        table = Table(title=f"Training step on {device}, batch {b}, {s}x{s}")
        cols = ["model", "precision", "method", "median ms", "÷ plain", "÷ timm-ckpt", "÷ revnet"]
        if not cuda:
            cols += ["paired ÷ plain", "paired ÷ timm-ckpt", "paired ÷ revnet"]
        else:
            cols += ["act MiB", "mem ÷ plain", "mem ÷ timm-ckpt"]
        for col in cols:
            left = col in ("model", "precision", "method")
            table.add_column(col, justify="left" if left else "right")
        for r in group:
            cells = [r["model"], r["precision"], r["method"], f"{r['median_s'] * 1e3:.1f}",
                     f"{r['time_vs_plain']:.2f}", f"{r['time_vs_timm_ckpt']:.2f}",
                     f"{r.get('time_vs_revnet', float('nan')):.2f}"]
            if not cuda:
                cells += [f"{r['paired_vs_plain']:.2f}", f"{r['paired_vs_timm_ckpt']:.2f}",
                          f"{r.get('paired_vs_revnet', float('nan')):.2f}"]
            else:
                cells += [f"{mib(r['peak_above_baseline_bytes']):.0f}",
                          f"{r['mem_vs_plain']:.2f}", f"{r['mem_vs_timm_ckpt']:.2f}"]
            table.add_row(*cells)
        console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=parse_list, default=["resnet50"],
                        help="comma-separated timm model names")
    parser.add_argument("--batch", type=int, default=8, help="CPU batch size")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1, help="CPU warm-up steps per method")
    parser.add_argument("--steps", type=int, default=5, help="CPU timed steps per method")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA measurement")
    parser.add_argument("--cuda-batch", type=int, default=64)
    parser.add_argument("--cuda-warmup", type=int, default=3)
    parser.add_argument("--cuda-steps", type=int, default=10)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: list[dict[str, Any]] = []
    for name in args.models:
        if not args.no_cpu:
            rows += time_cpu(name, args.batch, args.size, args.warmup, args.steps)
        if torch.cuda.is_available() and not args.no_cuda:
            rows += time_cuda(name, args.cuda_batch, args.size, args.cuda_warmup, args.cuda_steps)
    if not rows:
        console().print("Nothing measured (--no-cpu and no CUDA device).")
        return
    add_ratios(rows)
    display(rows)
    if args.json:
        write_json(args.json, rows, benchmark="step_time")


if __name__ == "__main__":
    main()
