"""``torch.compile`` of a converted model against eager: first-step time, steady step time,
graph breaks and recompiles, beside plain and timm checkpointing in the same process.

A converted trunk runs eagerly inside ``torch.compile`` (NOTE [ torch.compile ] in
revify/_install.py): dynamo breaks the graph at the trunk's plan and compiles what surrounds it
(timm's ``forward_head``), so the compiled step is the eager trunk plus a compiled head.
``revify.compile_units`` compiles each unit of the trunk on its own (regional compilation, NOTE
[ Regional compile ] in revify/_compile.py); its row counts the units' graphs.
The steady steps of each method are interleaved (one of each in turn) and the median is
reported.

Run::

    .venv/bin/python benchmarks/compile_step.py --models resnet50 --size 64 --batch 4
    python benchmarks/compile_step.py --device cuda --precision bf16 --size 224 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import build_model, console, parse_list, ratio, write_json
from rich.table import Table
from torch._dynamo.utils import counters

import revify

# (method, how it is compiled: "" eager, "model" torch.compile(model), "units" compile_units)
_VARIANTS = (("plain", ""), ("timm-ckpt", ""), ("revify", ""), ("plain", "model"),
             ("revify", "model"), ("revify", "units"))
_LABELS = {"": "", "model": " (compiled)", "units": " (compile_units)"}


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool
          ) -> Callable[[], float]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def run() -> float:
        sync()
        start = time.perf_counter()
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        model.zero_grad(set_to_none=False)
        sync()
        return time.perf_counter() - start

    return run


def measure(name: str, size: int, batch: int, steps: int, device: str, bf16: bool
            ) -> list[dict[str, object]]:
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    runs, rows = {}, {}
    for method, compiled in _VARIANTS:
        label = method + _LABELS[compiled]
        model = build_model(name, method, size=size, num_classes=10, device=device)
        torch._dynamo.reset()
        counters.clear()
        call = torch.compile(model) if compiled == "model" else model
        if compiled == "units":
            revify.compile_units(model)
        run = _step(call, x, y, bf16)
        first = run()
        run()  # a second step: dynamo may recompile on the second call
        rows[label] = dict(
            model=name, method=label, first_s=first,
            graph_breaks=sum(counters["graph_break"].values()) if compiled else 0,
            recompiles=sum(counters["recompiles"].values()) if compiled else 0,
            graphs=counters["stats"]["unique_graphs"],
        )
        runs[label] = run
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(steps):
        for label, run in runs.items():
            times[label].append(run())
    plain = statistics.median(times["plain"])
    ckpt = statistics.median(times["timm-ckpt"])
    for label, row in rows.items():
        med = statistics.median(times[label])
        row.update(step_s=med, vs_plain=ratio(med, plain), vs_timm=ratio(med, ckpt))
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    for name in parse_list(args.models):
        results += measure(name, args.size, args.batch, args.steps, args.device,
                           args.precision == "bf16")
    table = Table(title=f"torch.compile vs eager, {args.device}, {args.precision}, batch "
                        f"{args.batch}, {args.size}px")
    for col in ("model", "method", "first step s", "step s", "÷ plain", "÷ timm", "breaks",
                "recompiles", "graphs"):
        table.add_column(col)
    for r in results:
        table.add_row(r["model"], r["method"], f"{r['first_s']:.1f}", f"{r['step_s']:.3f}",
                      f"{r['vs_plain']:.2f}", f"{r['vs_timm']:.2f}", str(r["graph_breaks"]),
                      str(r["recompiles"]), str(r["graphs"]))
    console().print(table)
    if args.json:
        write_json(args.json, results, size=args.size, batch=args.batch, device=args.device,
                   precision=args.precision)


if __name__ == "__main__":
    main()
