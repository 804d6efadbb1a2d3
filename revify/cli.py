"""The ``revify`` command line: ``revify audit MODEL`` prints the memory audit of a timm model
(``--budget 24GiB``: of the fastest plan that fits); ``revify fit MODEL --memory 80GiB`` prints
the largest batch that fits per method.

The model is built locally with random weights (``pretrained=False``): nothing is downloaded.
Exit codes: 0 success, 1 the model cannot be converted or audited, 2 bad usage (unknown model,
an output path that cannot be written).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .audit import AuditReport

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``revify`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = _parser().parse_args(argv)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revify",
        description="Convert residual networks into reversible ones to save activation memory.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser(
        "audit",
        help="memory audit of a timm model, before and after conversion (no download)",
        description=(
            "Build a timm model locally with random weights, convert it, and print the bytes "
            "saved for backward per block before and after, measured on fake tensors."
        ),
    )
    audit.add_argument("model", help="timm model name, e.g. resnet50")
    audit.add_argument("--batch-size", type=_positive, default=64, help="batch size (default 64)")
    audit.add_argument(
        "--img-size", type=_positive, default=None,
        help="input height and width (default: the model's pretrained_cfg input_size)",
    )
    audit.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "none"], default="sgd",
                       help="optimizer for the peak estimate (default sgd with momentum)")
    audit.add_argument("--json", metavar="PATH", help="write the report as JSON ('-': stdout)")
    audit.add_argument("--markdown", metavar="PATH",
                       help="write the report as markdown ('-': stdout)")
    audit.add_argument("--plot", metavar="PATH", help="save a bar chart (e.g. audit.png)")
    audit.add_argument(
        "--coupling", choices=["faithful", "revnet"], default="faithful",
        help="faithful (default: keeps a pretrained network's function) or revnet (alpha=0, "
             "beta=1: for training from scratch)",
    )
    audit.add_argument("--alpha", type=float, default=None, help="override the coupling's alpha")
    audit.add_argument("--beta", type=float, default=None, help="override the coupling's beta")
    audit.add_argument(
        "--exact", action=argparse.BooleanOptionalAction, default=None,
        help="override whether streams are fixed-point (needed for small beta)",
    )
    audit.add_argument("--no-checkpoint-stem", dest="checkpoint_stem", action="store_false",
                       help="do not checkpoint the layers before the first stage")
    audit.add_argument("--no-checkpoint-transitions", dest="checkpoint_transitions",
                       action="store_false", help="do not checkpoint the layers between stages")
    audit.add_argument(
        "--budget", metavar="SIZE", default=None,
        help="plan for this training peak (e.g. 24GiB, or 0.5 of plain's peak): audit the "
             "fastest plan that fits and print it against plain and timm checkpointing",
    )
    audit.set_defaults(run=_audit_command)

    fit = commands.add_parser(
        "fit",
        help="largest batch that fits a memory size, per method (no download)",
        description=(
            "Build a timm model locally with random weights and print, for plain training, "
            "timm's checkpointing and revify, the largest batch whose simulated training peak "
            "fits --memory, with the modelled step time (on this machine's device) and samples/s."
        ),
    )
    fit.add_argument("model", help="timm model name, e.g. resnet152")
    fit.add_argument("--memory", required=True, metavar="SIZE", help="e.g. 80GiB")
    fit.add_argument("--img-size", type=_positive, default=None,
                     help="input height and width (default: the model's own)")
    fit.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "none"], default="sgd")
    fit.add_argument("--verify", action="store_true",
                     help="simulate each answer at its batch (slower) instead of extrapolating")
    fit.add_argument("--json", metavar="PATH", help="write the rows as JSON ('-': stdout)")
    fit.set_defaults(run=_fit_command)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _timm_model(command: str, name: str, img_size: int | None) -> tuple[Any, tuple[int, ...]]:
    """The timm model built locally, and its input shape (C, H, W); SystemExit(2) if unknown."""
    import timm

    from .convert import _default_example

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; see timm.list_models()"
        print(f"revify {command}: unknown timm model {name!r}{hint}", file=sys.stderr)
        raise SystemExit(2)
    model = timm.create_model(name, pretrained=False)
    shape = tuple(_default_example(model).shape[1:])  # the size the model was built for
    if img_size is not None:
        shape = (shape[0], img_size, img_size)
    return model, shape


def _audit_command(args: argparse.Namespace) -> int:
    import torch

    from .audit import audit
    from .convert import convert
    from .planner import plan_memory

    for flag in ("json", "markdown", "plot"):
        problem = _unwritable(getattr(args, flag))
        if problem:  # checked first: the audit itself can take minutes
            print(f"revify audit: cannot write --{flag} {getattr(args, flag)}: {problem}",
                  file=sys.stderr)
            return 2
    try:
        model, shape = _timm_model("audit", args.model, args.img_size)
    except SystemExit as e:
        return int(e.code or 2)
    options = dict(coupling=args.coupling, alpha=args.alpha, beta=args.beta, exact=args.exact,
                   checkpoint_stem=args.checkpoint_stem,
                   checkpoint_transitions=args.checkpoint_transitions)
    memory_plan = None
    try:
        with warnings.catch_warnings():
            # "nothing converted": the report's notes say why.
            warnings.filterwarnings("ignore", message="revify.convert")
            if args.budget is not None:
                memory_plan = plan_memory(model, shape, args.batch_size,
                                          memory_budget=_budget(args.budget),
                                          optimizer=args.optimizer,
                                          tradeoff_points=5 if args.plot else 0, **options)
            # The model is ours: convert it in place (audit would otherwise convert a copy).
            convert(model, torch.zeros(2, *shape), plan=memory_plan, **options)
            report = audit(model, shape, args.batch_size, optimizer=args.optimizer, **options)
        if memory_plan is not None:
            report.tradeoff = [dict(p, label="planned") for p in memory_plan.tradeoff] + [
                dict(label=name, peak_bytes=b["peak_bytes"], time_s=b["time_s"])
                for name, b in memory_plan.baselines.items()
            ] + [dict(label="this plan", peak_bytes=memory_plan.peak_bytes,
                      time_s=memory_plan.time_s)]
    except (RuntimeError, ValueError, TypeError) as e:
        # User-facing failures, no traceback: ConversionError (a RuntimeError), a shape the
        # model rejects, bad --alpha/--beta, a budget no plan meets.
        print(f"revify audit: {args.model}: {e}", file=sys.stderr)
        return 1
    _write(args, report)
    if memory_plan is not None and "-" not in (args.json, args.markdown):
        print(memory_plan)
    return 0


def _budget(text: str) -> int | float | str:
    """``--budget``: a fraction such as ``0.5`` stays a float, anything else a size string."""
    try:
        value = float(text)
    except ValueError:
        return text
    return value if value <= 1 else int(value)


def _fit_command(args: argparse.Namespace) -> int:
    from .planner import fit, parse_budget

    problem = _unwritable(args.json)
    if problem:
        print(f"revify fit: cannot write --json {args.json}: {problem}", file=sys.stderr)
        return 2
    try:
        memory = parse_budget(args.memory)
    except (ValueError, TypeError) as e:
        print(f"revify fit: {e}", file=sys.stderr)
        return 2
    try:
        model, shape = _timm_model("fit", args.model, args.img_size)
    except SystemExit as e:
        return int(e.code or 2)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="revify.convert")
            rows = fit(model, shape, memory, optimizer=args.optimizer, verify=args.verify)
    except (RuntimeError, ValueError, TypeError) as e:
        print(f"revify fit: {args.model}: {e}", file=sys.stderr)
        return 1
    data = [dict(vars(r), samples_per_s=r.samples_per_s) for r in rows]
    if args.json is not None:
        text = json.dumps(dict(model=args.model, input_shape=list(shape), memory_bytes=memory,
                               optimizer=args.optimizer, rows=data), indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
            return 0
        Path(args.json).write_text(text)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"revify fit: {args.model}, input {'x'.join(map(str, shape))}, "
                        f"{memory / 2**30:.1f} GiB, optimizer {args.optimizer}")
    for col in ("method", "largest batch", "training peak GiB", "step s (modelled)",
                "samples/s", "batch vs plain"):
        table.add_column(col, justify="left" if col == "method" else "right")
    plain = rows[0].batch_size
    for r in rows:
        table.add_row(r.method, str(r.batch_size), f"{r.peak_bytes / 2**30:.2f}",
                      f"{r.time_s:.3f}", f"{r.samples_per_s:.1f}",
                      f"{r.batch_size / plain:.2f}x" if plain else "-")
    Console().print(table)
    return 0


def _unwritable(path: str | None) -> str | None:
    """Why a report cannot be written to ``path``, or None (also for no path and ``-``)."""
    if path is None or path == "-":
        return None
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        return "it is a directory"
    if not folder.is_dir():
        return f"directory {folder} does not exist"
    if target.exists() and not os.access(target, os.W_OK):
        return "permission denied"
    if not target.exists() and not os.access(folder, os.W_OK | os.X_OK):
        return f"directory {folder} is not writable"
    return None


def _write(args: argparse.Namespace, report: AuditReport) -> None:
    """Print the rich table unless stdout carries JSON or markdown; write the requested files."""
    to_stdout = "-" in (args.json, args.markdown)
    if not to_stdout:
        report.print_rich()
    for path, text in ((args.json, "to_json"), (args.markdown, "to_markdown")):
        if path is None:
            continue
        content = getattr(report, text)()
        if path == "-":
            sys.stdout.write(content if content.endswith("\n") else content + "\n")
        else:
            Path(path).write_text(content if content.endswith("\n") else content + "\n")
    if args.plot:
        report.plot(args.plot)
