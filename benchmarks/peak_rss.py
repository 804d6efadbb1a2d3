"""Peak resident memory of one training step, each method in a fresh process.

``saved_bytes.py`` counts only what autograd's saved-tensor hooks see. This script measures the
whole process instead: for every (method, model) pair it starts this script again as a child
(``--child METHOD MODEL``), which builds the model, the SGD optimizer and the batch, reads its
peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), runs exactly one forward + backward +
``optimizer.step()`` with nothing warmed up, reads the peak again and reports the increase. A
fresh process per measurement matters: the peak RSS never goes down, and the allocator keeps
freed memory around, so a second measurement in one process would see the first one's peak.

The gradients are allocated before the first peak reading (zeros, as they are from the second
step of training on with ``zero_grad(set_to_none=False)``), so they are part of the baseline, as
in ``memory_speed.py``'s CUDA figures: the increase is what activations, the backward's working
set and library workspaces cost. ``--grads step`` leaves them to the step instead (one more copy
of the weights in every method's increase). Plain SGD (no momentum) keeps no optimizer state.
The peak before the step can exceed the current RSS (model initialisation has temporaries);
both are reported.

The RSS also holds memory the C allocator keeps after tensors are freed. glibc raises its mmap
threshold each time a large mmapped block is freed (up to 32 MiB), after which tensors of that
size come from the heap, whose freed space is reused but rarely returned: the RSS peak then
depends on the allocation pattern, not only on the bytes alive at once. ``--mmap-threshold``
fixes the threshold (``MALLOC_MMAP_THRESHOLD_`` in the children's environment) so that large
tensors are always mmapped and given back on free, which makes RSS track live memory closely.

Run::

    .venv/bin/python benchmarks/peak_rss.py --models resnet50,resnet152 --json rss.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import METHODS, build_model, console, mib, parse_list, ratio, write_json
from rich.table import Table

_KIB = 1024  # ru_maxrss is in KiB on Linux


def _peak_rss_bytes() -> int:
    """Peak RSS of this process so far (the kernel's high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KIB


def _current_rss_bytes() -> int | None:
    """Current RSS from ``/proc/self/statm`` (Linux), None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize()


def run_child(
    method: str, name: str, batch: int, size: int, threads: int, grads: str = "before"
) -> dict[str, Any]:
    """Child process body: one training step from cold, peak RSS before and after."""
    torch.set_num_threads(threads)
    model = build_model(name, method, size=size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if grads == "before":
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    target = torch.randint(0, model.num_classes, (batch,), generator=gen)

    current_before = _current_rss_bytes()
    peak_before = _peak_rss_bytes()
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    peak_after = _peak_rss_bytes()
    return dict(model=name, method=method, batch=batch, size=size, threads=threads, grads=grads,
                peak_before=peak_before, current_before=current_before, peak_after=peak_after,
                increase=peak_after - peak_before, loss=loss.item())


def measure(
    method: str, name: str, batch: int, size: int, threads: int, mmap_threshold: int | None,
    grads: str = "before",
) -> dict[str, Any]:
    """Run :func:`run_child` in a fresh interpreter and return its result."""
    cmd = [sys.executable, __file__, "--child", method, name, "--batch", str(batch),
           "--size", str(size), "--threads", str(threads), "--grads", grads]
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"peak_rss: child {method} {name} failed (exit {proc.returncode}):\n{proc.stderr}"
        )
    # The result is the last stdout line; warnings go to stderr.
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["malloc_mmap_threshold"] = mmap_threshold
    return row


def measure_repeated(
    method: str, name: str, batch: int, size: int, threads: int, mmap_threshold: int | None,
    repeats: int, grads: str = "before",
) -> dict[str, Any]:
    """The median run of ``repeats`` fresh processes (RSS peaks vary from run to run by tens of
    MiB: with several threads, glibc hands out memory from per-thread arenas in timing-dependent
    order)."""
    runs = [measure(method, name, batch, size, threads, mmap_threshold, grads)
            for _ in range(repeats)]
    runs.sort(key=lambda r: r["increase"])
    row = runs[len(runs) // 2]
    row["increases"] = [r["increase"] for r in runs]
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``vs_plain`` and ``vs_timm_ckpt`` (ratios of the increase) per model, in place."""
    for name in {r["model"] for r in rows}:
        group = [r for r in rows if r["model"] == name]
        by = {r["method"]: r["increase"] for r in group}
        for r in group:
            r["vs_plain"] = ratio(r["increase"], by.get("plain", 0))
            r["vs_timm_ckpt"] = ratio(r["increase"], by.get("timm-ckpt", 0))


def display(
    rows: list[dict[str, Any]], batch: int, size: int, mmap_threshold: int | None
) -> None:
    """Print one row per model and method."""
    malloc = "glibc default" if mmap_threshold is None else f"mmap threshold {mmap_threshold}"
    grads = "gradients in the baseline" if rows and rows[0].get("grads") == "before" else (
        "gradients allocated by the step")
    table = Table(title=f"Peak RSS increase of one training step, batch {batch}, "
                        f"{size}x{size}, malloc: {malloc}, {grads}")
    cols = ("model", "method", "RSS before MiB", "peak before MiB", "peak after MiB",
            "increase MiB", "all runs MiB", "÷ plain", "÷ timm-ckpt")
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        current = "-" if r["current_before"] is None else f"{mib(r['current_before']):.0f}"
        table.add_row(r["model"], r["method"], current, f"{mib(r['peak_before']):.0f}",
                      f"{mib(r['peak_after']):.0f}", f"{mib(r['increase']):.0f}",
                      " ".join(f"{mib(i):.0f}" for i in r["increases"]),
                      f"{r['vs_plain']:.3f}", f"{r['vs_timm_ckpt']:.2f}")
    console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=parse_list, default=["resnet50", "resnet152"],
                        help="comma-separated timm model names")
    parser.add_argument("--methods", type=parse_list, default=list(METHODS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh processes per measurement; the median is reported")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set MALLOC_MMAP_THRESHOLD_ in the children (e.g. 131072)")
    parser.add_argument("--grads", choices=("before", "step"), default="before",
                        help="allocate the gradients before the step (baseline) or in it")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        method, name = args.child
        print(json.dumps(run_child(method, name, args.batch, args.size, args.threads,
                                   args.grads)))
        return

    rows = []
    for name in args.models:
        for method in args.methods:
            rows.append(measure_repeated(method, name, args.batch, args.size, args.threads,
                                         args.mmap_threshold, args.repeats, args.grads))
    add_ratios(rows)
    display(rows, args.batch, args.size, args.mmap_threshold)
    if args.json:
        write_json(args.json, rows, benchmark="peak_rss")


if __name__ == "__main__":
    main()
