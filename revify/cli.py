"""The ``revify`` command line: ``revify audit MODEL`` prints the memory audit of a timm model.

The model is built locally with random weights (``pretrained=False``): nothing is downloaded.
Exit codes: 0 success, 1 the model cannot be converted or audited, 2 bad usage (unknown model,
an output path that cannot be written).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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
    audit.set_defaults(run=_audit_command)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _audit_command(args: argparse.Namespace) -> int:
    import timm
    import torch

    from .audit import audit
    from .convert import _default_example, convert

    for flag in ("json", "markdown", "plot"):
        problem = _unwritable(getattr(args, flag))
        if problem:  # checked first: the audit itself can take minutes
            print(f"revify audit: cannot write --{flag} {getattr(args, flag)}: {problem}",
                  file=sys.stderr)
            return 2
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=5)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; see timm.list_models()"
        print(f"revify audit: unknown timm model {args.model!r}{hint}", file=sys.stderr)
        return 2
    model = timm.create_model(args.model, pretrained=False)
    shape = tuple(_default_example(model).shape[1:])  # the size the model was built for
    if args.img_size is not None:
        shape = (shape[0], args.img_size, args.img_size)
    options = dict(coupling=args.coupling, alpha=args.alpha, beta=args.beta, exact=args.exact,
                   checkpoint_stem=args.checkpoint_stem,
                   checkpoint_transitions=args.checkpoint_transitions)
    try:
        # The model is ours: convert it in place (audit would otherwise convert a deep copy).
        with warnings.catch_warnings():
            # "nothing converted": the report's notes say why.
            warnings.filterwarnings("ignore", message="revify.convert")
            convert(model, torch.zeros(2, *shape), **options)
            report = audit(model, shape, args.batch_size, optimizer=args.optimizer, **options)
    except (RuntimeError, ValueError, TypeError) as e:
        # User-facing failures, no traceback: ConversionError (a RuntimeError), a shape the
        # model rejects, bad --alpha/--beta.
        print(f"revify audit: {args.model}: {e}", file=sys.stderr)
        return 1
    _write(args, report)
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
