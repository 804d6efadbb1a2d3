"""Plot peak activation memory per sample against ResNet depth, one line per method.

Reads the JSON files written by ``memory_speed.py`` and keeps the rows of one device, precision
and batch size whose model is a ResNet (``resnet50``, ``resnet101``, ...)::

    python benchmarks/plot_depth.py benchmarks/results/cuda_*.json --precision bf16 --batch 64 \
        --out docs/performance_depth.png
    python benchmarks/plot_depth.py benchmarks/results/sim_peak.json \
        --out docs/performance_depth_sim.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_DEPTH = re.compile(r"^resnet(\d+)$")


def load_rows(paths: list[str], precision: str, batch: int) -> tuple[list[dict[str, Any]], str]:
    """ResNet rows of the given precision and batch, and the device they came from."""
    rows = []
    for path in paths:
        rows += json.loads(Path(path).read_text())["results"]
    keep = [r for r in rows
            if _DEPTH.match(r["model"]) and r["precision"] == precision and r["batch"] == batch]
    devices = sorted({r["device"] for r in keep})
    if len(devices) != 1:
        raise SystemExit(f"plot_depth: expected rows from one device, got {devices or 'none'}")
    return keep, devices[0]


def plot(rows: list[dict[str, Any]], device: str, precision: str, batch: int, out: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((int(_DEPTH.match(r["model"])[1]),
                         r["peak_above_baseline_bytes"] / 2**20 / r["batch"])
                        for r in rows if r["method"] == method)
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set_xlabel("ResNet depth")
    ax.set_ylabel("peak activation memory, MiB per sample")
    where = "simulated on fake tensors" if device == "fake" else device
    ax.set_title(f"{where}, {precision}, batch {batch}, 224x224", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", help="memory_speed.py result files")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="performance_depth.png")
    args = parser.parse_args(argv)
    rows, device = load_rows(args.json, args.precision, args.batch)
    plot(rows, device, args.precision, args.batch, args.out)


if __name__ == "__main__":
    main()
