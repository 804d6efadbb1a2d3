"""The memory planner over budgets: simulated peak and modelled step time of the plan chosen at
each budget, beside plain training, timm's ``set_grad_checkpointing(True)`` and revify's
single-treatment plans, all simulated in one process (fake tensors, nothing allocated).

For each model it builds one planner (three uniform plans measured, NOTE [ Planning ] in
revify/planner.py), then chooses at budgets spread from the least reachable peak to plain
training's, and at timm checkpointing's peak. Times are revify's own model of this machine's
device (NOTE [ Step costs ] in revify/_costs.py); with ``--time-model`` the shared GPU time
model's H100 prediction for plain, timm-ckpt and revify's default is printed beside, for
comparison of the ratios. It also times how long ``revify.plan_memory`` takes to answer.

    .venv/bin/python benchmarks/planner.py                       # resnet50, batch 64, bf16
    .venv/bin/python benchmarks/planner.py --models resnet50,resnet152,vit_base_patch16_224,\
convnext_base --json benchmarks/results/planner.json --plot docs/planner_pareto.png
    .venv/bin/python benchmarks/planner.py --answer resnet152:256  # time one plan_memory call
    .venv/bin/python benchmarks/planner.py --models "" --cpu-steps resnet50:8  # real CPU steps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import timm
import torch
from _common import console, parse_list, ratio, write_json
from _time_model import find_tool, predict
from rich.table import Table
from step_time import _batch, interleaved_times, make_step

import revify
from revify import planner

GIB = 2**30


def sweep(name: str, batch: int, size: int, precision: str, points: int) -> dict[str, Any]:
    """Plans at ``points`` budgets between the least peak and plain's, and at timm's peak."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    converted = revify.convert(copy.deepcopy(model), torch.zeros(2, 3, size, size), strict=True)
    t0 = time.perf_counter()
    p = planner._Planner(converted, (batch, 3, size, size), torch.float32,
                         torch.device("cpu"), precision=precision)
    base = p.baselines(model)
    uniform = {f"revify {k}": dict(peak_bytes=m.peak + p.persistent, time_s=m.time_s,
                                   treatments=p.uniform[k]) for k, m in p.measured.items()}
    low = min(u["peak_bytes"] for u in uniform.values())
    high = base["plain"]["peak_bytes"]
    budgets = [int(low + (high - low) * i / max(points - 1, 1)) for i in range(points)]
    if "timm-ckpt" in base:
        budgets.append(int(base["timm-ckpt"]["peak_bytes"]))
    chosen = []
    for b in sorted(set(budgets)):
        try:
            treatments, sim = p.choose(b)
        except ValueError:
            continue
        peak = sim.peak + p.persistent
        fitting = [u["time_s"] for u in uniform.values() if u["peak_bytes"] <= b]
        chosen.append(dict(budget_bytes=b, peak_bytes=peak, time_s=sim.time_s,
                           treatments=treatments, fits=peak <= b,
                           beats_uniform=all(sim.time_s <= t * (1 + 1e-9) for t in fitting),
                           at_timm_peak=b == budgets[-1] and "timm-ckpt" in base))
    return dict(model=name, batch=batch, size=size, precision=precision, device=p.speed.device,
                seconds=time.perf_counter() - t0, baselines=base, uniform=uniform,
                plans=chosen)


def answer_time(name: str, batch: int, size: int, precision: str) -> dict[str, Any]:
    """Seconds ``revify.plan_memory`` takes at half of plain's peak, and ``revify.fit`` at
    80 GiB."""
    model = timm.create_model(name, pretrained=False)
    t0 = time.perf_counter()
    mp = revify.plan_memory(model, (3, size, size), batch, memory_budget=0.5, precision=precision)
    t1 = time.perf_counter()
    rows = revify.fit(model, (3, size, size), "80GiB", precision=precision)
    t2 = time.perf_counter()
    return dict(model=name, batch=batch, precision=precision, plan_memory_s=t1 - t0,
                fit_s=t2 - t1, plan=mp.to_dict(),
                fit=[dict(vars(r), samples_per_s=r.samples_per_s) for r in rows])


def cpu_steps(name: str, batch: int, size: int, warmup: int = 1, steps: int = 3
              ) -> dict[str, Any]:
    """Real fp32 CPU step times, interleaved: plain, timm-ckpt, revify's default and revify
    planned for timm checkpointing's simulated peak (the same batch)."""
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False)
    timm_ckpt = copy.deepcopy(base)
    timm_ckpt.set_grad_checkpointing(True)
    plan = revify.plan_memory(base, (3, size, size), batch, memory_budget=1.0)
    budget = int(plan.baselines["timm-ckpt"]["peak_bytes"])
    planned = revify.plan_memory(base, (3, size, size), batch, memory_budget=budget)
    models = {
        "plain": copy.deepcopy(base), "timm-ckpt": timm_ckpt,
        "revify": revify.convert(copy.deepcopy(base), torch.zeros(2, 3, size, size)),
        "revify @ timm peak": revify.convert(copy.deepcopy(base), torch.zeros(2, 3, size, size),
                                             plan=planned),
    }
    x, target = _batch(batch, size, "cpu", channels_last=False)
    runs = {k: make_step(m.train(), x, target, None, 0.9) for k, m in models.items()}
    times = interleaved_times(runs, warmup, steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(model=name, batch=batch, size=size, budget_bytes=budget,
                treatments=planned.treatments, median_s=med,
                vs_timm={k: v / med["timm-ckpt"] for k, v in med.items()})


def display(result: dict[str, Any], tool_rows: dict[str, float]) -> None:
    base = result["baselines"]
    plain_t = base["plain"]["time_s"]
    timm_t = base.get("timm-ckpt", {}).get("time_s")
    table = Table(title=f"{result['model']}, batch {result['batch']}, {result['size']}², "
                        f"{result['precision']} (modelled on {result['device']}; planner "
                        f"{result['seconds']:.0f} s)")
    for col in ("plan", "budget GiB", "peak GiB", "time ÷ plain", "time ÷ timm",
                "H100 model ÷ plain", "fits", "≤ uniform", "treatments"):
        table.add_column(col, justify="left" if col in ("plan", "treatments") else "right")

    def row(label: str, budget: Any, r: dict[str, Any], extra: tuple[str, ...] = ("", ""),
            tool: str = "") -> None:
        t = r["time_s"]
        table.add_row(label, "-" if budget is None else f"{budget / GIB:.2f}",
                      f"{r['peak_bytes'] / GIB:.2f}", f"{ratio(t, plain_t):.2f}",
                      "-" if timm_t is None else f"{ratio(t, timm_t):.2f}", tool, *extra,
                      _short(r.get("treatments", {})))

    row("plain", None, base["plain"], tool=_tool(tool_rows, "plain"))
    if "timm-ckpt" in base:
        row("timm-ckpt", None, base["timm-ckpt"], tool=_tool(tool_rows, "timm-ckpt"))
    for label, u in result["uniform"].items():
        row(label, None, u, tool=_tool(tool_rows, "revify") if label == "revify reversible"
            else "")
    for c in result["plans"]:
        label = "planned @ timm peak" if c["at_timm_peak"] else "planned"
        row(label, c["budget_bytes"], c, ("yes" if c["fits"] else "NO",
                                          "yes" if c["beats_uniform"] else "NO"))
    console().print(table)
    console().print("steps: " + ", ".join(result["uniform"]["revify store"]["treatments"]))


def _tool(rows: dict[str, float], method: str) -> str:
    if method not in rows or "plain" not in rows:
        return ""
    return f"{rows[method] / rows['plain']:.2f}"


def _short(treatments: dict[str, str]) -> str:
    """One letter per step in execution order: R reversible, C checkpoint (Ck: its first k
    units), S store; e.g. ``C R S R S S S S``."""
    def letter(t: str) -> str:
        return {"reversible": "R", "checkpoint": "C", "store": "S"}.get(t, "C" + t[11:])
    return " ".join(letter(t) for t in treatments.values())


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        plain_t = r["baselines"]["plain"]["time_s"]
        pts = sorted((c["peak_bytes"] / GIB, c["time_s"] / plain_t) for c in r["plans"])
        ax.plot(*zip(*pts, strict=True), "o-", label="revify, planned per budget")
        for label, u in r["uniform"].items():
            ax.plot(u["peak_bytes"] / GIB, u["time_s"] / plain_t, "x", label=label)
        for label, marker in (("plain", "s"), ("timm-ckpt", "D")):
            if label in r["baselines"]:
                b = r["baselines"][label]
                ax.plot(b["peak_bytes"] / GIB, b["time_s"] / plain_t, marker, label=label)
        ax.set_title(f"{r['model']} b{r['batch']} {r['precision']}")
        ax.set_xlabel("simulated training peak (GiB)")
        ax.set_ylabel("modelled step time ÷ plain")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=parse_list, default=["resnet50"],
                        help="models to sweep ('' for none)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--points", type=int, default=6, help="budgets per model")
    parser.add_argument("--answer", type=parse_list, default=[],
                        help="MODEL:BATCH,...: time plan_memory and fit (80 GiB) on them")
    parser.add_argument("--cpu-steps", type=parse_list, default=[],
                        help="MODEL:BATCH,...: real fp32 CPU steps of plain, timm-ckpt, revify "
                             "and revify planned at timm's peak")
    parser.add_argument("--time-model", action="store_true",
                        help="also run the shared GPU time model (../shared/tools)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="save the memory-vs-time picture here")
    args = parser.parse_args(argv)
    tool = find_tool() if args.time_model else None
    results, answers = [], []
    for name in args.models:
        r = sweep(name, args.batch, args.size, args.precision, args.points)
        rows = {}
        if tool is not None:
            for method in ("plain", "timm-ckpt", "revify"):
                got = predict(tool, name, method, args.precision, args.batch, args.size)
                if got is not None:
                    rows[method] = got["step_s"]
            r["time_model_h100_s"] = rows
        display(r, rows)
        results.append(r)
    for spec in args.answer:
        name, _, batch = spec.partition(":")
        a = answer_time(name, int(batch or 256), args.size, args.precision)
        console().print(f"{name} batch {a['batch']}: plan_memory {a['plan_memory_s']:.1f} s, "
                        f"fit at 80 GiB {a['fit_s']:.1f} s: " + ", ".join(
                            f"{f['method']} {f['batch_size']}" for f in a["fit"]))
        answers.append(a)
    steps = []
    for spec in args.cpu_steps:
        name, _, batch = spec.partition(":")
        c = cpu_steps(name, int(batch or 8), args.size)
        console().print(f"{name} batch {c['batch']} CPU step (median s): " + ", ".join(
            f"{k} {v:.3f} ({c['vs_timm'][k]:.2f}x timm)" for k, v in c["median_s"].items())
            + f"; plan at timm's peak: {_short(c['treatments'])}")
        steps.append(c)
    if args.json:
        write_json(args.json, results, answers=answers, cpu_steps=steps)
    if args.plot and results:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
