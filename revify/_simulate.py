"""Run a model on fake tensors and follow the memory its training step would hold.

``revify.audit`` uses these to simulate one forward + backward without allocating activations:
``fake_parameters`` swaps every parameter and buffer for a fake copy for as long as the step
runs (backward included, where recomputes read the model's attributes again), and
``LiveBytes`` counts the bytes of every storage the step creates while it is alive. Its peak is
the counterpart of ``torch.cuda.max_memory_allocated`` above weights and gradients; it does not
see kernels' own workspaces (oneDNN, cuDNN) nor allocator rounding and fragmentation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__: list[str] = []


class LiveBytes(TorchDispatchMode):
    """Counts the storages that ops create while the mode is on, until Python frees them.

    An op's output that shares a storage with one of its inputs (an in-place op, a view) is no
    allocation; a storage is counted once, when it first comes out of an op.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def _freed(self, n_bytes: int) -> None:
        self.live -= n_bytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        known = {
            t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            st = t.untyped_storage()
            if st._cdata in known or st in self._sizes:
                continue
            n_bytes = st.nbytes()
            self._sizes[st] = n_bytes
            self.live += n_bytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._freed, n_bytes)
        return out


@contextlib.contextmanager
def fake_model(model: nn.Module) -> Iterator[None]:
    """While the body runs, tensors it creates are fake and so are ``model``'s parameters and
    buffers (:func:`fake_parameters`); the global RNG state is put back afterwards."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.random.fork_rng(devices=[]), FakeTensorMode(allow_non_fake_inputs=True):
        with fake_parameters(model):
            yield


@contextlib.contextmanager
def fake_parameters(model: nn.Module) -> Iterator[None]:
    """Replace every parameter and buffer of ``model`` by a fake tensor of the same kind while the
    body runs (under an active ``FakeTensorMode``); each parameter that requires grad gets a
    zero gradient, as it has in every step after the first. A tensor shared by several modules
    gets one fake. The originals are put back afterwards, untouched."""
    fakes: dict[int, Tensor] = {}
    swapped: list[tuple[dict[str, Any], str, Tensor]] = []

    def fake(t: Tensor, parameter: bool) -> Tensor:
        if id(t) not in fakes:
            f = torch.empty_like(t)
            if parameter:
                f = nn.Parameter(f, requires_grad=t.requires_grad)
                if t.requires_grad:
                    f.grad = torch.zeros_like(f)
            fakes[id(t)] = f
        return fakes[id(t)]

    try:
        for m in model.modules():
            for table, parameter in ((m._parameters, True), (m._buffers, False)):
                for name, t in list(table.items()):
                    if t is not None:
                        swapped.append((table, name, t))
                        table[name] = fake(t, parameter)
        yield
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t
