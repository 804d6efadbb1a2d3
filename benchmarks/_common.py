"""Helpers shared by the benchmark scripts: building the three training methods, units, JSON.

Every benchmark compares the same three ways of training a timm model:

- ``plain``: the model as timm builds it, ordinary autograd.
- ``timm-ckpt``: timm's ``set_grad_checkpointing(True)``, one ``torch.utils.checkpoint`` per
  residual block (the usual baseline for trading compute for memory).
- ``revify``: ``revify.convert(model)`` with its defaults (reversible stages with the faithful
  coupling, checkpointed stem and transitions).

``build_model`` also takes ``revify-revnet``: ``revify.convert(model, coupling="revnet")``.

The scripts are run as files (``python benchmarks/saved_bytes.py``), so this module is imported
as a top-level module from the script's own folder.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from rich.console import Console
from torch import Tensor, nn

import revify

__all__ = [
    "DEFAULT",
    "FAITHFUL",
    "METHODS",
    "REVNET",
    "REVNET_METHOD",
    "build_model",
    "console",
    "environment",
    "mib",
    "parse_list",
    "ratio",
    "write_json",
]

METHODS: tuple[str, ...] = ("plain", "timm-ckpt", "revify")
# Also accepted by build_model: revify with the RevNet coupling (alpha=0, beta=1, float streams).
REVNET_METHOD = "revify-revnet"

# Couplings, as ``revify.convert`` keyword arguments. FAITHFUL keeps a pretrained network's
# function (issue 12); REVNET is the RevNet coupling, for training from scratch.
FAITHFUL: dict[str, Any] = dict(alpha=63 / 64, beta=1 / 64, exact=True)
REVNET: dict[str, Any] = dict(alpha=0.0, beta=1.0)
# What the benchmarks call "the default": ``revify.convert(model)``'s own default (FAITHFUL).
DEFAULT: dict[str, Any] = {}

_MIB = 1024**2


def build_model(
    name: str,
    method: str,
    *,
    size: int = 224,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    seed: int = 0,
    convert_options: dict[str, Any] | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A freshly initialised timm model (random weights, train mode) set up for ``method``.

    The model is moved to ``device`` (and ``channels_last``) *before* conversion, so revify
    traces it where it will run; the example input of the conversion has that device too.

    Args:
        name: timm model name, e.g. ``"resnet50"``. Built locally, nothing is downloaded.
        method: one of :data:`METHODS`.
        size: input height and width, used for revify's example input (shapes only).
        device: where the model lives.
        channels_last: convert weights to ``torch.channels_last`` (the fast layout on GPUs).
        seed: RNG seed for the weight initialisation, so every method gets the same weights.
        convert_options: extra keyword arguments of ``revify.convert`` (e.g. ``alpha=0.5``).
        timm_kwargs: passed to ``timm.create_model`` (e.g. ``zero_init_last=False``).
    """
    if method not in (*METHODS, REVNET_METHOD):
        raise ValueError(
            f"benchmarks: unknown method {method!r}; expected one of {(*METHODS, REVNET_METHOD)}"
        )
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **timm_kwargs)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    if method == "timm-ckpt":
        model.set_grad_checkpointing(True)
    elif method in ("revify", REVNET_METHOD):
        example = torch.zeros(2, 3, size, size, device=device)
        coupling = {"coupling": "revnet"} if method == REVNET_METHOD else {}
        options = {**coupling, **(convert_options or {})}
        revify.convert(model, example, strict=True, **options)
    return model


def console() -> Console:
    """A rich console that does not squeeze tables to 80 columns when output is piped."""
    out = Console()
    return out if out.is_terminal else Console(width=140)


def mib(n_bytes: float) -> float:
    """Bytes to MiB."""
    return n_bytes / _MIB


def ratio(num: float, den: float) -> float:
    """``num / den``, NaN when ``den`` is 0 (a table cell rather than a crash)."""
    return num / den if den else float("nan")


def parse_list(text: str) -> list[str]:
    """``"resnet50,resnet152"`` -> ``["resnet50", "resnet152"]`` (argparse ``type=``)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def environment() -> dict[str, Any]:
    """Versions and machine description stored next to every JSON result."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "revify": revify.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):  # other processes on the machine skew CPU timings
        env["loadavg_1_5_15min"] = list(os.getloadavg())
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def write_json(path: str | Path, results: Sequence[dict[str, Any]], **extra: Any) -> None:
    """Write ``{"environment": ..., **extra, "results": results}`` to ``path``."""
    payload = {"environment": environment(), **extra, "results": list(results)}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


class SavedBytes:
    """Pack hook counting the bytes saved for backward: each distinct storage once, except the
    storages of ``excluded`` tensors (parameters). Packed tensors are kept until the counter is
    dropped, so a storage id cannot be reused by another tensor during the pass.

    Use as ``with SavedBytes(params) as counter: loss = ...`` then read ``counter.total``.
    """

    def __init__(self, excluded: Iterable[Tensor] = ()) -> None:
        self.excluded = {t.untyped_storage()._cdata for t in excluded}
        self.packed: list[Tensor] = []
        self.sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: Tensor) -> Tensor:
        self.packed.append(t)
        storage = t.untyped_storage()
        if storage._cdata not in self.excluded:
            self.sizes[storage._cdata] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
