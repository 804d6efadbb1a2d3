"""Run reversible stages and checkpointed segments under FSDP2 (``fully_shard``).

NOTE [ FSDP2 ]
FSDP2 keeps each parameter sharded (a DTensor in the module's slot) and, around every call of
a ``fully_shard``-ed module, swaps in the unsharded parameter (a plain ``nn.Parameter`` whose
storage it all-gathers and frees) by forward hooks. With grad enabled those hooks also hang a
pre-backward hook on the module's outputs (unshard again before backward) and an autograd node
on its inputs whose backward runs ``post_backward`` (reduce-scatter ``unsharded_param.grad``
into the sharded parameter's ``.grad``, then reshard). revify runs units and segments inside
custom autograd Functions under ``torch.no_grad()``, so those hooks register nothing, the
Function's inputs were the sharded DTensors read before the call, and the recompute in backward
re-entered FSDP's forward logic and swapped parameters under revify's stand-ins.

So revify drives the FSDP state of the parameters it reads itself, as FSDP drives itself for
activation checkpointing: a state already in its forward (its module encloses the stage, like
the root) is left to its own hooks; for the others (*driven* states: their module is called
inside the Function, or never called at all) the stage or segment

- unshards them before reading its parameters (``FSDPParamGroup.pre_forward``), so the
  Function's inputs, whose gradients it returns, are the unsharded parameters FSDP reduces;
- puts FSDP's post-backward node (``RegisterPostBackwardFunction``) on the inputs of the first
  unit reading each state, so the reduce-scatter runs once that state's gradients exist;
- runs its body with the state's training state at ``PRE_BACKWARD``, the mode in which FSDP's
  module hooks only cast inputs and outputs (mixed precision) and keep parameters unsharded;
- reshards after the forward (``post_forward``: as ``reshard_after_forward`` says);
- before each recompute in backward runs the state's pre-backward (unshard, prefetch, queue the
  root's final callback), again if a post-backward resharded it in between.

Only full parameters of ``fully_shard`` are handled; the FSDP root must be initialised by its
own forward first (``fully_shard(model)`` on the root, as in torchtitan), else the first
forward raises. All of it goes through FSDP2's private state objects (torch 2.14).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor

from ._replay import _EPOCH, Slot

__all__: list[str] = []

try:  # FSDP2 may be missing (a build without torch.distributed)
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import (
        RegisterPostBackwardFunction,
    )
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
except ImportError:  # pragma: no cover
    _module_state_mapping = {}  # type: ignore[assignment]
    FSDPState = None  # type: ignore[assignment,misc]


def active() -> bool:
    """Whether any ``fully_shard`` (or other composable API) state exists in the process: the
    per-call check that keeps this module free when FSDP2 is not used."""
    return bool(_module_state_mapping)


def _all_states() -> list[Any]:
    """Every live FSDP2 state in the process (none without ``fully_shard``: a cheap check)."""
    if not _module_state_mapping:
        return []
    out: dict[int, Any] = {}
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if FSDPState is not None and isinstance(state, FSDPState):
            out.setdefault(id(state), state)
    return list(out.values())


def _param_owners(states: Sequence[Any]) -> dict[tuple[int, str], Any]:
    """``(id(module._parameters), name) -> state`` for every parameter the states manage."""
    out: dict[tuple[int, str], Any] = {}
    for state in states:
        for group in state._fsdp_param_groups:
            for fp in group.fsdp_params:
                info = fp._module_info
                out[(id(info.module._parameters), info.param_name)] = state
                for m, n in zip(info.shared_modules, info.shared_param_names, strict=True):
                    out[(id(m._parameters), n)] = state
    return out


def states_of(holder: Any, slots: Sequence[Slot]) -> list[Any]:
    """The FSDP states managing the parameters in ``slots`` (a unit's or segment's), in slot
    order, cached on ``holder`` until a ``fully_shard`` call or a registration (NOTE [ Slot
    cache ] in _replay.py)."""
    if not _module_state_mapping:
        return []
    key = (len(_module_state_mapping), _EPOCH[0])
    cached = holder.__dict__.get("_fsdp_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    owners = _param_owners(_all_states())
    found: dict[int, Any] = {}
    for d, name in slots:
        state = owners.get((id(d), name))
        if state is not None:
            found.setdefault(id(state), state)
    out = list(found.values())
    holder._fsdp_cache = (key, out)
    return out


def driven(states: Sequence[Any], what: str) -> list[Any]:
    """The states revify must drive (NOTE [ FSDP2 ]): those not inside their own forward."""
    out = [s for s in states if s._training_state != TrainingState.FORWARD]
    for s in out:
        if s._is_root is None:
            names = ", ".join(type(m).__name__ for m in s._modules)
            raise RuntimeError(
                f"revify: {what}: its parameters are sharded by fully_shard ({names}) but no "
                "FSDP root has run forward yet; apply fully_shard to the model's root module "
                "too (after the blocks) and call the model itself"
            )
    return out


def unshard(states: Sequence[Any]) -> None:
    """All-gather the states' parameters and put the unsharded ones in the modules' slots."""
    for s in states:
        for group in s._fsdp_param_groups:
            group.pre_forward(None, (), {})


def reshard(states: Sequence[Any]) -> None:
    """End the states' forward: reshard as ``reshard_after_forward`` says, record the order."""
    for s in states:
        for group in s._fsdp_param_groups:
            group.post_forward(None, None, None)


def post_backward_on(states: Sequence[Any], tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``tensors`` passed through FSDP's post-backward node of each state: its backward (once
    the gradients of ``tensors`` exist, so the parameters' gradients have been accumulated)
    reduce-scatters the states' gradients. Tensors not requiring grad are passed as they are;
    with none, FSDP's final callback reduces them at the end of the backward."""
    out = list(tensors)
    idx = [i for i, t in enumerate(out) if isinstance(t, Tensor) and t.requires_grad]
    if not idx:
        return tuple(out)
    for s in states:
        for group in s._fsdp_param_groups:
            got = RegisterPostBackwardFunction.apply(group, *(out[i] for i in idx))
            for i, t in zip(idx, got, strict=True):
                out[i] = t
    return tuple(out)


@contextlib.contextmanager
def hooks_pass_through(states: Sequence[Any]) -> Iterator[None]:
    """Within the body, the states' module hooks only cast (mixed precision) and keep the
    parameters unsharded: FSDP's mode for recomputes in backward (``PRE_BACKWARD``)."""
    before = [s._training_state for s in states]
    for s in states:
        s._training_state = TrainingState.PRE_BACKWARD
    try:
        yield
    finally:
        for s, b in zip(states, before, strict=True):
            s._training_state = b


def pre_backward(states: Sequence[Any]) -> None:
    """Before a recompute: each state's pre-backward (unshard where resharded, prefetch)."""
    for s in states:
        if s._training_state != TrainingState.PRE_BACKWARD or not all(
            g.is_unsharded for g in s._fsdp_param_groups
        ):
            s._pre_backward(None)


# NOTE [ Sharded before convert ]
# convert traces the model and runs it (and its blocks) eagerly on example inputs. On a model
# already sharded by fully_shard that would start FSDP's lazy initialisation from whichever
# module runs first, and its hooks would all-gather around every probe and trace with Proxies.
# So convert first initialises the FSDP root as its first forward would (``_lazy_init``: the
# model itself must be that root), all-gathers every state's parameters into the modules'
# slots, and runs with the hooks passing through (PRE_BACKWARD, as for recomputes); after it,
# every state is resharded. Every rank converts the same model in the same order, so the
# collectives match. The converted model then runs as one converted before sharding. A
# mixed-precision policy is refused there: its hooks cast the inputs of every call, which a
# trace with Proxies cannot pass through, and without them the bf16 parameters would meet the
# float32 example (convert first, then shard, for that).


_CONVERTING = contextvars.ContextVar("revify_converting_sharded", default=False)


def converting() -> bool:
    """Whether :func:`unsharded` is running a conversion now."""
    return _CONVERTING.get()


def _state_of(module: Any) -> Any:
    ref = _module_state_mapping.get(module) if _module_state_mapping else None
    state = ref() if ref is not None else None
    return state if FSDPState is not None and isinstance(state, FSDPState) else None


def is_sharded_root(model: Any) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` itself."""
    return _state_of(model) is not None


def casting_modules(model: Any) -> list[str]:
    """Paths of the modules under ``model`` sharded with a mixed-precision policy that casts
    parameters or outputs (``MixedPrecisionPolicy(param_dtype=...)``)."""
    out = []
    for name, m in model.named_modules():
        state = _state_of(m)
        policy = getattr(state, "_mp_policy", None)
        if policy is not None and (policy.param_dtype is not None
                                   or policy.output_dtype is not None):
            out.append(name or type(model).__name__)
    return out


@contextlib.contextmanager
def unsharded(model: Any) -> Iterator[None]:
    """Within the body, ``model`` (sharded by ``fully_shard`` itself) and every FSDP module
    under it hold their unsharded parameters and FSDP's hooks pass through (NOTE [ Sharded
    before convert ])."""
    root = _state_of(model)
    root._lazy_init()  # as the root's first forward would: no-op after one
    states = list(root._state_ctx.all_states)
    groups = [g for s in states for g in s._fsdp_param_groups]
    for g in groups:
        g.unshard()
        g.wait_for_unshard()
    token = _CONVERTING.set(True)
    try:
        with hooks_pass_through(states):
            yield
    finally:
        _CONVERTING.reset(token)
        for g in groups:
            g.reshard()


def sharded_modules(model: Any) -> list[str]:
    """Paths of the modules under ``model`` that ``fully_shard`` was applied to (``""``: the
    model itself, shown as its class name)."""
    if not _module_state_mapping:
        return []
    return [name or type(model).__name__ for name, m in model.named_modules()
            if _state_of(m) is not None]
