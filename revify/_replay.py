"""Repeat a forward computation exactly during backward: RNG, autocast and BatchNorm statistics.

A recompute must produce the same values as the forward it replaces (same dropout masks, same
autocast casts) and must not change module state a second time (BatchNorm running statistics).
Both the reversible stages (``coupling.py``) and the checkpointed segments (``checkpoint.py``)
use these helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__: list[str] = []


class _ForwardState:
    """RNG and autocast state captured just before a forward call, replayed by :meth:`replay`.

    Only the default generators are captured (CPU, and the tensor's accelerator when it has one),
    as ``torch.utils.checkpoint`` does. Capturing copies a few kilobytes; it is skipped when the
    caller says the computation draws no random numbers.
    """

    __slots__ = ("device_type", "device_index", "cpu_rng", "device_rng", "autocast", "cache")

    def __init__(self, device: torch.device, capture_rng: bool = True) -> None:
        self.device_type = device.type
        self.device_index = device.index
        self.cpu_rng = torch.get_rng_state() if capture_rng else None
        self.device_rng = None
        if capture_rng and device.type not in ("cpu", "meta"):  # meta tensors draw nothing
            mod = torch.get_device_module(device.type)
            self.device_index = device.index if device.index is not None else mod.current_device()
            self.device_rng = mod.get_rng_state(self.device_index)
        types = {"cpu", device.type}
        self.autocast = {
            t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
            for t in types
            if torch.amp.is_autocast_available(t)
        }
        self.cache = torch.is_autocast_cache_enabled()

    def restart(self) -> None:
        """Set the generators back to the captured state (to redo a forward from its start)."""
        if self.cpu_rng is not None:
            torch.set_rng_state(self.cpu_rng)
        if self.device_rng is not None:
            torch.get_device_module(self.device_type).set_rng_state(
                self.device_rng, self.device_index
            )

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with the captured RNG state (restored afterwards) and autocast settings."""
        with contextlib.ExitStack() as stack:
            if self.cpu_rng is not None:
                devices = [self.device_index] if self.device_rng is not None else []
                stack.enter_context(
                    torch.random.fork_rng(
                        devices=devices, device_type=self.device_type if devices else "cuda"
                    )
                )
                torch.set_rng_state(self.cpu_rng)
                if self.device_rng is not None:
                    mod = torch.get_device_module(self.device_type)
                    mod.set_rng_state(self.device_rng, self.device_index)
            for t, (enabled, dtype) in self.autocast.items():
                stack.enter_context(
                    torch.autocast(t, dtype=dtype, enabled=enabled, cache_enabled=self.cache)
                )
            yield


def batchnorms(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    """Every BatchNorm under ``modules``, subclasses such as timm's ``BatchNormAct2d`` included."""
    seen: dict[int, _BatchNorm] = {}
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, _BatchNorm):
                seen[id(sub)] = sub
    return list(seen.values())


@contextlib.contextmanager
def frozen_running_stats(bns: Iterable[_BatchNorm]) -> Iterator[None]:
    """Train-mode BatchNorm uses batch statistics but leaves running statistics alone.

    ``_BatchNorm.forward`` passes ``running_mean=None`` and skips ``num_batches_tracked`` when
    ``track_running_stats`` is False, so switching it off for the recompute gives the same
    normalisation without a second update (``torch.utils.checkpoint`` updates twice).
    """
    switched = [bn for bn in bns if bn.training and bn.track_running_stats]
    for bn in switched:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn in switched:
            bn.track_running_stats = True


def check_same_tensors(what: str, forward_ids: Sequence[int], tensors: Sequence[Tensor]) -> None:
    """Raise if the tensors requiring grad that a recompute reads are not those of the forward.

    A recompute reads the model's attributes when it runs. Swapped parameters, as in
    ``torch.func.functional_call``, are swapped back by then, so the recompute would silently
    use other weights.
    """
    if [id(t) for t in tensors] == list(forward_ids):
        return
    if len(tensors) != len(forward_ids):
        why = "the set of tensors requiring grad changed (requires_grad toggled mid-step?)"
    else:
        why = ("its parameters are not the ones the forward used (torch.func.functional_call or "
               "another parameter swap that ends before backward)")
    raise RuntimeError(
        f"revify: {what}: {why}; the recompute in backward reads the model's own parameters, "
        "so run forward and backward with the same ones"
    )
