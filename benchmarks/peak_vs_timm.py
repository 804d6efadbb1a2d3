"""Simulated training-step peak of plain training, timm checkpointing and revify's default plan,
for every model that ``docs/coverage.md`` says converts.

The models, their constructors and their input sizes are those of ``coverage.py`` (its
``MODELS`` list, ``_create`` and ``_input_size``: 224 px unless the model has a fixed input
size); the models listed under "## Not converted" in ``docs/coverage.md`` are left out
(``--all`` keeps them; ``--coverage PATH`` reads another file). For each model, in one process:

- ``plain``: the unconverted model.
- ``timm-ckpt``: ``set_grad_checkpointing(True)`` on a ``copy.deepcopy`` of it, for models that
  have the method ("n/a" for the torchvision ones).
- ``revify``: ``revify.convert(copy.deepcopy(model), torch.zeros(2, 3, S, S))``, its default
  (minimum-memory) plan.

Each is measured by ``revify._costs.measure`` (one train-mode forward and backward on fake
tensors, nothing of the activations' size allocated): ``peak`` is the peak of live tensor bytes
above weights and gradients, ``time_s`` revify's modelled step time on this machine's CPU
(``revify._costs.speed("cpu")``). The training peak adds the persistent bytes of that model:
parameters + buffers + gradients + SGD momentum (``revify.audit``'s ``persistent_bytes`` with
``optimizer="sgd"``). Reported ratios are revify ÷ timm-ckpt of the live step peak, of the
training peak and of the modelled time, and revify ÷ plain of the training peak.

``--markdown PATH`` writes the section "Training peak against timm checkpointing" of
``docs/coverage.md`` (``coverage.py`` rewrites that file without it: append it again).

Run (about 7 minutes on two busy cores for the 54 models)::

    .venv/bin/python benchmarks/peak_vs_timm.py --json --markdown /tmp/peak_vs_timm.md
    .venv/bin/python benchmarks/peak_vs_timm.py --models resnet50,vit_base_patch16_224 \\
        --precision bf16
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import re
import statistics
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import console, mib, parse_list, ratio, write_json
from coverage import MODELS, Spec, _create, _input_size, _is_torchvision
from rich.table import Table
from torch import nn

import revify
from revify import _costs, planner

METHODS = ("plain", "timm-ckpt", "revify")
DEFAULT_JSON = "benchmarks/results/peak_vs_timm.json"
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
_OPTIMIZER_STATES = 1  # SGD with momentum: one state tensor per parameter requiring grad


# ----------------------------------------------------------------------------------------------
# Which models


def not_converted_in(path: str | Path) -> set[str]:
    """Model names listed under "## Not converted" in a ``coverage.py`` markdown file."""
    names: set[str] = set()
    section = False
    for line in Path(path).read_text().splitlines():
        if line.startswith("## "):
            section = line.strip() == "## Not converted"
            continue
        match = re.match(r"- `([^`]+)`", line)
        if section and match:
            names.add(match.group(1))
    return names


def _spec(name: str) -> Spec:
    for s in MODELS:
        if s.name == name:
            return s
    return Spec(name, "torchvision" if _is_torchvision(name) else "—")


# ----------------------------------------------------------------------------------------------
# Measuring


def _measure(model: nn.Module, shape: tuple[int, ...], autocast: torch.dtype | None
             ) -> dict[str, Any]:
    kwargs = {"autocast": autocast} if autocast is not None else {}
    m = _costs.measure(model, shape, torch.float32, torch.device("cpu"), _costs.speed("cpu"),
                       **kwargs)
    persistent = planner.persistent_bytes(model)  # SGD momentum: one state
    return dict(step_peak=m.peak, persistent=persistent, train_peak=m.peak + persistent,
                time_s=m.time_s, peak_at=peak_step(m))


def peak_step(m: _costs.Measurement) -> str:
    """The plan step and phase whose live bytes reach the measurement's peak ("" without a
    plan: an unconverted model's ops are all labelled as the input's or the loss's)."""
    best, where = -1, ""
    for name, c in m.steps.items():
        for start, extra, phase in ((c.fwd_start, c.fwd_extra, "forward"),
                                    (c.bwd_start, c.bwd_extra, "backward")):
            if start >= 0 and start + extra > best:
                best, where = start + extra, f"{name} {phase}"
    planned = any(name not in (_costs.INPUT, _costs.LOSS) for name in m.steps)
    return where if planned else ""


def _exc(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0] if text else type(e).__name__


def measure_model(spec: Spec, batch: int, precision: str) -> dict[str, Any]:
    """The three methods' simulated step of one model; errors are recorded, not raised."""
    row: dict[str, Any] = dict(model=spec.name, family=spec.family, batch=batch,
                               precision=precision, error="")
    start = time.perf_counter()
    autocast = _AUTOCAST[precision]
    try:
        model = _create(spec.name).train()
    except Exception as e:
        row["error"] = f"build: {_exc(e)}"
        row["seconds"] = time.perf_counter() - start
        return row
    size, _ = _input_size(model)
    shape = (batch, 3, size, size)
    row.update(size=size, params=sum(p.numel() for p in model.parameters()))

    def run(method: str, build: Any) -> None:
        try:
            m = build()
            if m is None:
                row[method] = None  # not applicable (row["timm_na"] says why)
                return
            row[method] = _measure(m, shape, autocast)
        except Exception as e:
            row[method] = dict(error=_exc(e))
            traceback.print_exc()
        finally:
            gc.collect()

    def timm_ckpt() -> nn.Module | None:
        if not callable(getattr(model, "set_grad_checkpointing", None)):
            row["timm_na"] = "no set_grad_checkpointing"
            return None
        ckpt = copy.deepcopy(model)
        try:
            ckpt.set_grad_checkpointing(True)
        except AssertionError as e:  # timm's "gradient checkpointing not supported"
            row["timm_na"] = f"set_grad_checkpointing(True): {e}"
            return None
        return ckpt

    def converted() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rev = revify.convert(copy.deepcopy(model), torch.zeros(2, 3, size, size))
        stages = revify.stages(rev)
        if not stages:
            raise RuntimeError("revify.convert converted nothing")
        row["stages"] = len(stages)
        row["units"] = sum(len(s.units) for s in stages)
        return rev

    run("plain", lambda: model)
    run("timm-ckpt", timm_ckpt)
    run("revify", converted)
    errors = [f"{k}: {row[k]['error']}" for k in METHODS
              if isinstance(row.get(k), dict) and "error" in row[k]]
    row["error"] = "; ".join(errors)
    _ratios(row)
    row["seconds"] = time.perf_counter() - start
    return row


def _ok(row: dict[str, Any], method: str) -> dict[str, Any] | None:
    r = row.get(method)
    return r if isinstance(r, dict) and "error" not in r else None


def _ratios(row: dict[str, Any]) -> None:
    rev, timm_r, plain = _ok(row, "revify"), _ok(row, "timm-ckpt"), _ok(row, "plain")
    row["step_ratio_timm"] = ratio(rev["step_peak"], timm_r["step_peak"]) if rev and timm_r \
        else None
    row["train_ratio_timm"] = ratio(rev["train_peak"], timm_r["train_peak"]) if rev and timm_r \
        else None
    row["time_ratio_timm"] = ratio(rev["time_s"], timm_r["time_s"]) if rev and timm_r else None
    row["train_ratio_plain"] = ratio(rev["train_peak"], plain["train_peak"]) if rev and plain \
        else None


# ----------------------------------------------------------------------------------------------
# Output


def _mib_cell(row: dict[str, Any], method: str, key: str) -> str:
    r = row.get(method, "missing")
    if r is None:
        return "n/a"
    if not isinstance(r, dict):
        return "—"
    return "error" if "error" in r else f"{mib(r[key]):.0f}"


def _peak_at(row: dict[str, Any]) -> str:
    r = _ok(row, "revify")
    return f"`{r['peak_at']}`" if r and r.get("peak_at") else "—"


def _ratio_cell(v: float | None, digits: str = ".2f") -> str:
    return "—" if v is None else format(v, digits)


def summary(rows: list[dict[str, Any]], worst: int = 5) -> dict[str, Any]:
    """How often revify's training peak is ≤ timm's, the median ratio and the worst models."""
    compared = [r for r in rows if r.get("train_ratio_timm") is not None]
    ratios = [r["train_ratio_timm"] for r in compared]
    step = [r["step_ratio_timm"] for r in compared]
    ordered = sorted(compared, key=lambda r: -r["train_ratio_timm"])
    return dict(
        models=len(rows),
        compared=len(compared),
        at_most_timm=sum(x <= 1.0 for x in ratios),
        median_train_ratio=statistics.median(ratios) if ratios else None,
        median_step_ratio=statistics.median(step) if step else None,
        timm_na={r["model"]: r.get("timm_na", "") for r in rows
                 if "timm-ckpt" in r and r["timm-ckpt"] is None},
        failed=[(r["model"], r["error"]) for r in rows if r.get("error")],
        worst=[(r["model"], r["train_ratio_timm"], r["step_ratio_timm"], r.get("units"),
                r["revify"].get("peak_at", "")) for r in ordered[:worst]],
    )


def _summary_text(s: dict[str, Any]) -> str:
    if not s["compared"]:
        return "No model had both a timm and a revify measurement."
    worst = ", ".join(f"`{m}` {t:.2f} (step {p:.2f}, {u} units, peak in {at or '?'})"
                      for m, t, p, u, at in s["worst"])
    text = (f"revify's default training peak is ≤ timm checkpointing's on {s['at_most_timm']} of "
            f"{s['compared']} models; median ratio {s['median_train_ratio']:.2f} (live step peak "
            f"{s['median_step_ratio']:.2f}); largest: {worst}.")
    if s["timm_na"]:
        na: dict[str, list[str]] = {}
        for model, why in s["timm_na"].items():
            na.setdefault(why, []).append(f"`{model}`")
        text += " No timm checkpointing: " + "; ".join(
            f"{', '.join(models)} ({why})" for why, models in na.items()) + "."
    if s["failed"]:
        text += " Failed: " + "; ".join(f"`{m}` ({e})" for m, e in s["failed"]) + "."
    return text


def to_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    s = summary(rows)
    lines = [
        "## Training peak against timm checkpointing",
        "",
        f"Generated by `benchmarks/peak_vs_timm.py` ({args.precision}, batch {args.batch}, "
        f"{seconds / 60:.1f} min). One simulated training step per model and method, on fake "
        "tensors in one process (`revify._costs.measure`: train-mode forward and backward, "
        "nothing of the activations' size allocated), at the survey's input size: *plain* is "
        "the unconverted model, *timm* its `set_grad_checkpointing(True)` on a deep copy (n/a: "
        "the model has no such method, or timm's raises \"not supported\"), *revify* "
        "`revify.convert(copy.deepcopy(model), "
        "torch.zeros(2, 3, S, S))`, the default minimum-memory plan. *Step* is the peak of live "
        "tensor bytes above weights and gradients; *training peak* adds parameters, buffers, "
        "gradients and SGD momentum (`revify.audit`'s `persistent_bytes`). Ratios are "
        "revify ÷ timm (and ÷ plain for the training peak); *time* is revify's modelled step "
        "time (`revify._costs.speed(\"cpu\")`, timed once per process, so on a busy machine "
        "the time ratios move by up to about 0.3 between runs) ÷ timm's; *revify's peak in* is "
        "the plan "
        "step and phase where revify's live bytes peak (`<loss>`: after the last plan step, "
        "e.g. an unconverted tail). Kernel workspaces and allocator fragmentation are not "
        "counted.",
        "",
        "| model | size | params M | units | step MiB plain / timm / revify | training peak MiB "
        "plain / timm / revify | step ÷ timm | training peak ÷ timm | training peak ÷ plain | "
        "time ÷ timm | revify's peak in |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "size" not in r:
            lines.append(f"| `{r['model']}` |" + " — |" * 10)
            continue
        step = " / ".join(_mib_cell(r, m, "step_peak") for m in METHODS)
        train = " / ".join(_mib_cell(r, m, "train_peak") for m in METHODS)
        lines.append(
            f"| `{r['model']}` | {r['size']} | {r['params'] / 1e6:.1f} | {r.get('units', '—')} "
            f"| {step} | {train} | {_ratio_cell(r.get('step_ratio_timm'))} | "
            f"{_ratio_cell(r.get('train_ratio_timm'))} | "
            f"{_ratio_cell(r.get('train_ratio_plain'))} | "
            f"{_ratio_cell(r.get('time_ratio_timm'))} | {_peak_at(r)} |")
    lines += ["", _summary_text(s)]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table = Table(title=f"simulated training peak, batch {args.batch}, {args.precision} "
                        "(MiB; ratios revify ÷ timm-ckpt unless noted)")
    columns = ("model", "size", "params\nM", "units", "step MiB\nplain/timm/revify",
               "train MiB\nplain/timm/revify", "step\n÷ timm", "train\n÷ timm",
               "train\n÷ plain", "time\n÷ timm")
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for r in rows:
        if "size" not in r:  # not built (errors are listed under the table)
            table.add_row(r["model"], *["-"] * (len(columns) - 1))
            continue
        table.add_row(
            r["model"], str(r["size"]), f"{r['params'] / 1e6:.1f}", str(r.get("units", "-")),
            " / ".join(_mib_cell(r, m, "step_peak") for m in METHODS),
            " / ".join(_mib_cell(r, m, "train_peak") for m in METHODS),
            _ratio_cell(r.get("step_ratio_timm")), _ratio_cell(r.get("train_ratio_timm")),
            _ratio_cell(r.get("train_ratio_plain")), _ratio_cell(r.get("time_ratio_timm")))
    out = console()
    out.print(table)
    out.print(_summary_text(summary(rows)))


# ----------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=parse_list, default=None,
                        help="comma-separated names (timm, or torchvision/<name>); default: "
                             "coverage.py's list less the models --coverage says do not convert")
    parser.add_argument("--coverage", default="docs/coverage.md",
                        help="coverage.py's markdown, read for its \"Not converted\" list")
    parser.add_argument("--all", action="store_true",
                        help="keep the models the coverage file says do not convert")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=tuple(_AUTOCAST), default="fp32",
                        help="bf16: the forward under CPU bf16 autocast")
    parser.add_argument("--max-params", type=float, default=None,
                        help="skip models with more parameters than this (millions)")
    parser.add_argument("--json", nargs="?", const=DEFAULT_JSON, default=None,
                        help=f"write the rows (rewritten after each model); default path "
                             f"{DEFAULT_JSON}")
    parser.add_argument("--markdown", help="write the docs/coverage.md section to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision != "fp32" and "autocast" not in inspect.signature(_costs.measure).parameters:
        parser.error("this revify's _costs.measure takes no autocast argument")

    if args.models:
        specs = [_spec(n) for n in args.models]
    else:
        skip: set[str] = set()
        if not args.all and Path(args.coverage).exists():
            skip = not_converted_in(args.coverage)
        specs = [s for s in MODELS if s.name not in skip]
    out = console()
    out.print(f"{len(specs)} models, batch {args.batch}, {args.precision}")

    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for spec in specs:
        if args.max_params is not None:
            n = sum(p.numel() for p in _create(spec.name).parameters())
            if n > args.max_params * 1e6:
                rows.append(dict(model=spec.name, family=spec.family, params=n,
                                 error=f"skipped: {n / 1e6:.0f}M parameters"))
                continue
        row = measure_model(spec, args.batch, args.precision)
        rows.append(row)
        t = row.get("train_ratio_timm")
        out.print(f"{spec.name:<34} train ÷ timm {_ratio_cell(t):>5}  step ÷ timm "
                  f"{_ratio_cell(row.get('step_ratio_timm')):>5}  {row['seconds']:5.1f}s"
                  + (f"  [{row['error'][:80]}]" if row["error"] else ""), markup=False)
        if args.json:
            write_json(args.json, rows, benchmark="peak_vs_timm", batch=args.batch,
                       precision=args.precision)
    seconds = time.perf_counter() - start
    print_table(rows, args)
    out.print(f"{len(rows)} models in {seconds / 60:.1f} min")
    if args.json:
        write_json(args.json, rows, benchmark="peak_vs_timm", batch=args.batch,
                   precision=args.precision, seconds=seconds, summary=summary(rows))
        out.print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(rows, args, seconds))
        out.print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
