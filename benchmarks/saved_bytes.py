"""Bytes saved for backward by one training forward: plain, timm checkpointing, revify.

Every tensor autograd stores for backward goes through the pack hook of
``torch.autograd.graph.saved_tensors_hooks``. We count each distinct storage once (many saved
tensors are views of one buffer, or the same tensor saved by two ops) and leave out parameter
storages, which exist whatever the method. We keep a reference to every packed tensor until the
count is done: otherwise a freed storage's address could be reused by a later tensor and the
deduplication by ``untyped_storage()._cdata`` would merge two different buffers.

Limits (DESIGN.md §4): tensors an autograd Function keeps as ``ctx`` attributes, or a closure
keeps alive, are invisible to the hooks; ``peak_rss.py`` measures the whole process instead.

Run::

    .venv/bin/python benchmarks/saved_bytes.py --models resnet50,resnet152 --json saved.json
    .venv/bin/python benchmarks/saved_bytes.py --models vit_base_patch16_224 --call intermediates
"""

from __future__ import annotations

import argparse
from typing import Any

import timm
import torch
import torch.nn.functional as F
from _common import (
    METHODS,
    REVNET_METHOD,
    SavedBytes,
    build_model,
    console,
    mib,
    parse_list,
    ratio,
    write_json,
)
from rich.table import Table
from torch import Tensor, nn


def count_saved_bytes(model: nn.Module, x: Tensor, target: Tensor, call: str = "forward"
                      ) -> tuple[int, int]:
    """Distinct non-parameter storage bytes saved for backward by ``loss(model(x))``.

    Args:
        model: a model in train mode whose parameters require grad.
        x: input batch (B, 3, H, W).
        target: class indices (B,).
        call: ``"forward"``, or ``"intermediates"``: a dense-task backbone's loss on every
            output of timm's ``forward_intermediates(x)`` (the final features and each
            block's).

    Returns:
        ``(bytes, n_saved)``: total bytes of distinct storages, and the number of pack calls.
    """
    with SavedBytes(model.parameters()) as counter:
        if call == "intermediates":
            final, maps = model.forward_intermediates(x)
            loss = final.float().square().mean() + sum(m.float().square().mean() for m in maps)
            del final, maps
        else:
            loss = F.cross_entropy(model(x), target)
    del loss  # frees the graph and, with it, the saved tensors
    return counter.total, len(counter.packed)


def measure(name: str, batch: int, size: int, seed: int, call: str = "forward"
            ) -> list[dict[str, Any]]:
    """One row per method for model ``name``: saved bytes on a real (B, 3, size, size) batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    rows = []
    for method in (*METHODS, REVNET_METHOD):
        model = build_model(name, method, size=size, seed=seed)
        target = torch.randint(0, model.num_classes, (batch,), generator=gen)
        n_bytes, n_saved = count_saved_bytes(model, x, target, call)
        rows.append(dict(model=name, method=method, bytes=n_bytes, mib=mib(n_bytes),
                         saved_tensors=n_saved, batch=batch, size=size))
        del model
    by = {r["method"]: r["bytes"] for r in rows}
    for r in rows:
        r["vs_plain"] = ratio(r["bytes"], by["plain"])
        r["vs_timm_ckpt"] = ratio(r["bytes"], by["timm-ckpt"])
    return rows


def display(rows: list[dict[str, Any]], batch: int, size: int, call: str = "forward") -> None:
    """Print the results as a rich table (one row per model and method)."""
    table = Table(title=f"Saved for backward ({call}), batch {batch}, {size}x{size}, train mode")
    for col in ("model", "method", "MiB", "saved tensors", "÷ plain", "÷ timm-ckpt"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        table.add_row(r["model"], r["method"], f"{r['mib']:.1f}", str(r["saved_tensors"]),
                      f"{r['vs_plain']:.3f}", f"{r['vs_timm_ckpt']:.2f}")
    console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=parse_list, default=["resnet50", "resnet152"],
                        help="comma-separated timm model names")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--call", choices=("forward", "intermediates"), default="forward",
                        help="what the loss is taken on: the classifier's output, or every "
                        "output of forward_intermediates (a dense-task backbone)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)

    # Non-reentrant checkpointing (timm's default) keeps each block's input alive in a closure
    # held by its saved-tensor hooks, which our outer hooks never see: the count would show
    # timm checkpointing as storing almost nothing. Re-entrant checkpointing stores the same
    # inputs with ctx.save_for_backward, which goes through our pack hook and is counted.
    timm.layers.set_reentrant_ckpt(True)

    rows = [r for name in args.models
            for r in measure(name, args.batch, args.size, args.seed, args.call)]
    display(rows, args.batch, args.size, args.call)
    if args.json:
        write_json(args.json, rows, benchmark="saved_bytes")


if __name__ == "__main__":
    main()
