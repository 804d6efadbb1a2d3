"""Repeat a forward computation exactly during backward: RNG, autocast and module state.

A recompute must produce the same values as the forward it replaces (same dropout masks, same
autocast casts, the buffers as the forward read them), must not change module state a second
time (BatchNorm running statistics, any buffer a forward writes), and must not run the
parameters' gradient hooks itself (NOTE [ Recompute leaves ]). Both the reversible stages
(``coupling.py``) and the checkpointed segments (``checkpoint.py``) use these helpers.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress, repeat
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.modules import module as _module
from torch.nn.modules.batchnorm import _BatchNorm

__all__: list[str] = []


@functools.cache
def _autocast_types(device_type: str) -> tuple[str, ...]:
    """The device types whose autocast state a forward on ``device_type`` depends on."""
    return tuple(t for t in dict.fromkeys(("cpu", device_type))
                 if torch.amp.is_autocast_available(t))


class _ForwardState:
    """RNG and autocast state captured just before a forward call, put back for the recompute
    by :meth:`enter` and :meth:`exit` (:class:`Recompute`).

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
        self.autocast = [
            (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
            for t in _autocast_types(device.type)
        ]
        self.cache = torch.is_autocast_cache_enabled()

    def restart(self) -> None:
        """Set the generators back to the captured state (to redo a forward from its start)."""
        if self.cpu_rng is not None:
            torch.set_rng_state(self.cpu_rng)
        if self.device_rng is not None:
            torch.get_device_module(self.device_type).set_rng_state(
                self.device_rng, self.device_index
            )

    def enter(self) -> tuple[Any, ...]:
        """Swap in the captured RNG state and set the captured autocast settings; returns what
        :meth:`exit` puts back. ``torch.random.fork_rng`` and an autocast context per device
        type did this in ~400 bytecodes per recompute (issue 14): here the generators are
        swapped directly and autocast is set, as ``torch.autocast.__enter__`` sets it, only for
        device types whose setting differs from the current one."""
        cpu_now = device_now = None
        if self.cpu_rng is not None:
            cpu_now = torch.get_rng_state()
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                mod = torch.get_device_module(self.device_type)
                device_now = mod.get_rng_state(self.device_index)
                mod.set_rng_state(self.device_rng, self.device_index)
        changed = []
        for t, enabled, dtype in self.autocast:
            now = torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)
            if now[0] != enabled or (enabled and now[1] != dtype):
                changed.append((t, now))
                torch.set_autocast_enabled(t, enabled)
                torch.set_autocast_dtype(t, dtype)
                torch.autocast_increment_nesting()
        cache_now = torch.is_autocast_cache_enabled()
        if changed:
            torch.set_autocast_cache_enabled(self.cache)
        return cpu_now, device_now, changed, cache_now

    def exit(self, entered: tuple[Any, ...]) -> None:
        """Undo :meth:`enter` (as ``torch.autocast.__exit__`` does for autocast)."""
        cpu_now, device_now, changed, cache_now = entered
        for t, (enabled, dtype) in reversed(changed):
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()
            torch.set_autocast_enabled(t, enabled)
            torch.set_autocast_dtype(t, dtype)
        torch.set_autocast_cache_enabled(cache_now)
        if cpu_now is not None:
            torch.set_rng_state(cpu_now)
        if device_now is not None:
            torch.get_device_module(self.device_type).set_rng_state(device_now, self.device_index)


def batchnorms(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    """Every BatchNorm under ``modules``, subclasses such as timm's ``BatchNormAct2d`` included."""
    seen: dict[int, _BatchNorm] = {}
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, _BatchNorm):
                seen[id(sub)] = sub
    return list(seen.values())


_UPDATES_STATS = operator.attrgetter("training", "track_running_stats")


def _freeze(bns: Iterable[_BatchNorm]) -> list[_BatchNorm]:
    """Switch off the running-statistics update of the train-mode BatchNorms in ``bns``; returns
    those switched, for :func:`_unfreeze`.

    ``_BatchNorm.forward`` passes ``running_mean=None`` and skips ``num_batches_tracked`` when
    ``track_running_stats`` is False, so switching it off for the recompute gives the same
    normalisation without a second update (``torch.utils.checkpoint`` updates twice).
    """
    switched = list(compress(bns, map(all, map(_UPDATES_STATS, bns))))
    # A plain attribute: set without nn.Module.__setattr__'s checks (it runs for every unit).
    for bn in switched:
        object.__setattr__(bn, "track_running_stats", False)
    return switched


def _unfreeze(switched: list[_BatchNorm]) -> None:
    for bn in switched:
        object.__setattr__(bn, "track_running_stats", True)


@contextlib.contextmanager
def frozen_running_stats(bns: Iterable[_BatchNorm]) -> Iterator[None]:
    """Train-mode BatchNorm uses batch statistics but leaves running statistics alone
    (:func:`_freeze`)."""
    switched = _freeze(bns)
    try:
        yield
    finally:
        _unfreeze(switched)


VERSION = operator.attrgetter("_version")


def check_same_tensors(what: str, forward_ids: Sequence[int], tensors: Sequence[Tensor],
                       forward_versions: Sequence[int] | None = None) -> None:
    """Raise if the tensors requiring grad that a recompute reads are not those of the forward,
    or (given their ``forward_versions``) were changed in place since.

    A recompute reads the model's attributes when it runs. Swapped parameters, as in
    ``torch.func.functional_call``, are swapped back by then, so the recompute would silently
    use other weights; a weight updated in place after the forward (``optimizer.step()`` or a
    clamp before ``backward()``) would be read with its new value, where ordinary autograd
    raises for the tensors it saved.
    """
    if list(map(id, tensors)) == list(forward_ids):
        if forward_versions is None or list(map(VERSION, tensors)) == list(forward_versions):
            return
        changed = [i for i, (t, v) in enumerate(zip(tensors, forward_versions, strict=True))
                   if t._version != v]
        shapes = ", ".join(str(tuple(tensors[i].shape)) for i in changed[:3])
        raise RuntimeError(
            f"revify: {what}: {len(changed)} of its parameters (shape {shapes}) were modified "
            "in place between the forward and this backward (an optimizer step or a weight "
            "update before backward()); the recompute would read the new values, so its "
            "gradients would be wrong. Update weights after backward(), as ordinary autograd "
            "requires for the tensors it saves"
        )
    if len(tensors) != len(forward_ids):
        why = "the set of tensors requiring grad changed (requires_grad toggled mid-step?)"
    else:
        why = ("its parameters are not the ones the forward used (torch.func.functional_call or "
               "another parameter swap that ends before backward)")
    raise RuntimeError(
        f"revify: {what}: {why}; the recompute in backward reads the model's own parameters, "
        "so run forward and backward with the same ones"
    )


TRAINING = operator.attrgetter("training")


def check_modes(what: str, forward_modes: Sequence[bool], slots: Slots) -> None:
    """Raise if a module the recompute runs was switched between train and eval mode since the
    forward (``model.eval()`` before ``backward()``): it would recompute another function
    (dropout off, BatchNorm on running statistics) than the forward's."""
    if list(map(TRAINING, slots.modules)) == list(forward_modes):
        return
    changed = [type(m).__name__ for m, t in zip(slots.modules, forward_modes, strict=False)
               if m.training != t]
    raise RuntimeError(
        f"revify: {what}: {', '.join(dict.fromkeys(changed)) or 'a module'} switched between "
        "train and eval mode after the forward; the recompute in backward would compute "
        "another function than the forward did. Call model.train() / model.eval() before the "
        "forward, not between forward and backward()"
    )


class Owners(NamedTuple):
    """Where a recomputed function finds its tensors: ``modules`` (with their submodules) and
    ``attrs``, ``(module, name)`` pairs for attributes it fetches itself (``get_attr`` nodes)."""

    modules: Sequence[nn.Module]
    attrs: Sequence[tuple[nn.Module, str]] = ()


Slot = tuple[dict[str, Any], str]  # a module's ``_parameters``/``_buffers``/``__dict__``, a key


def _submodules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """``modules`` and everything under them, once each (``nn.Module.modules()`` without its
    name strings: this runs for every unit at every step)."""
    seen: set[int] = set()
    out: list[nn.Module] = []
    stack = list(modules)[::-1]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


def _slots(owners: Owners) -> list[Slot]:
    """Every place ``owners`` hold a tensor (looked up at each call: ``model.to()`` and
    ``load_state_dict(assign=True)`` replace tensors, not slots)."""
    out: list[Slot] = []
    for sub in _submodules(owners.modules):
        out.extend((sub._parameters, k) for k in sub._parameters)
        out.extend((sub._buffers, k) for k in sub._buffers)
    for owner, name in owners.attrs:
        for d in (owner._parameters, owner._buffers, owner.__dict__):
            if name in d:
                out.append((d, name))
                break
    return out


# NOTE [ Recompute leaves ]
# The backward of a stage step or a segment recomputes its function and differentiates it with
# torch.autograd.grad(..., inputs=[parameters]). Capturing a leaf's gradient runs the leaf's
# tensor hooks (``p.register_hook``), and the gradient the autograd Function then returns runs
# them again when it reaches the parameter: a hook g -> 2g gave 4g. So the recompute reads every
# tensor it differentiates through a stand-in put in the module's slot for the recompute only: a
# new leaf sharing the tensor's memory and version counter, which has no hooks. Only the
# Function's returned gradient reaches the parameter, once, summed with its other uses, as with
# ordinary autograd (post-accumulate-grad hooks never ran in the recompute: its grad() call does
# not accumulate). Under create_graph the stand-in is a view of the tensor instead, so that the
# graph of the gradient still leads to the parameter.


def _stand_in(
    what: str, slots: Sequence[Slot], tensors: Sequence[Tensor], needs: Sequence[bool],
    linked: bool,
) -> tuple[list[Tensor], Any]:
    """Put in ``slots`` (``slots_of(...).slots``) a stand-in for each of ``tensors`` (NOTE
    [ Recompute leaves ]) that requires grad where ``needs`` says; returns the stand-ins, in
    order, and what :func:`_stand_back` needs.

    ``linked``: views of the tensors (their gradients' graph reaches the tensors), else detached
    leaves. A tensor found in no slot (none is, as units and segments list their tensors) is
    returned as itself: its gradient is still right, its hooks would run twice.
    """
    if not linked and all(needs) and not any(map(_TENSOR_HOOKS, tensors)):
        # No tensor hooks to run twice: the recompute reads the tensors themselves (~400
        # bytecodes and a detach per tensor less per recompute), and only checks that it still
        # read them from the slots.
        values = _slot_values(slots)
        ids = set(map(id, tensors))
        held = list(compress(slots, map(ids.__contains__, map(id, values))))
        return list(tensors), (None, held, _slot_values(held))
    stand: dict[int, Tensor] = {}
    for t, need in zip(tensors, needs, strict=True):
        stand[id(t)] = t.view_as(t) if linked and need else t.detach().requires_grad_(need)
    swapped: list[tuple[dict[str, Any], str, Tensor, Tensor]] = []
    values = _slot_values(slots)
    # the slots holding one of ``tensors``, found without a Python loop over all slots
    for i in compress(range(len(values)), map(stand.__contains__, map(id, values))):
        (d, key), v = slots[i], values[i]
        s = stand[id(v)]
        d[key] = s
        swapped.append((d, key, v, s))
    found = {id(v) for _, _, v, _ in swapped}
    return [stand[id(t)] if id(t) in found else t for t in tensors], (swapped, None, None)


def _stand_back(what: str, slots: Sequence[Slot], undo: Any, check: bool) -> None:
    """Put back what :func:`_stand_in` replaced; if ``check``, raise if the recompute replaced
    a tensor it read (after putting the slots back)."""
    swapped, held, values = undo
    if swapped is None:  # the slots holding the tensors, and those tensors
        if check and not all(map(operator.is_, _slot_values(held), values)):
            bad = next(k for (d, k), v in zip(held, values, strict=True) if d.get(k) is not v)
            raise RuntimeError(_replaced(what, bad))
        return
    bad = [key for d, key, _, s in swapped if d.get(key) is not s] if check else []
    for d, key, v, _ in reversed(swapped):
        d[key] = v
    if bad:
        raise RuntimeError(_replaced(what, bad[0]))


_TENSOR_HOOKS = operator.attrgetter("_backward_hooks")  # register_hook hooks, or None


def _replaced(what: str, key: str) -> str:
    return (
        f"revify: {what}: the recompute replaced the tensor {key!r} it reads (a forward "
        "pre-hook that sets parameters; FSDP2's fully_shard is handled, docs/distributed.md); "
        "the recompute must read the parameters the forward read: exclude this module from "
        "conversion or use revify.plain_autograd()"
    )


# NOTE [ Slot cache ]
# Every step, every unit and segment needs where its tensors live (the parameter and buffer
# slots of its modules), which of those buffers a forward may write, and its BatchNorms. Walking
# the modules for them cost ~7 ms per ResNet-50 step on an H100 host (issue 14). They depend on
# the module structure only, so slots_of computes them once per holder and reuses them until a
# module, parameter or buffer is registered anywhere: torch's global registration hooks
# (``nn.Module.__setattr__``, ``register_parameter``/``register_buffer``/``add_module``, and so
# ``load_state_dict(assign=True)`` and parametrizations) move _EPOCH. Slots hold
# ``(dict, key)``, so tensors replaced in place of a slot (``model.to()``) are read afresh at each
# call. Writing ``module._modules[name]`` directly bypasses the hooks: call
# ``revify.convert`` again after such surgery (the stand-in check of NOTE [ Recompute leaves ]
# and check_same_tensors then catch most stale reads, not all).

_EPOCH = [0]
_HOOKS: list[Any] = []


def _bump(*_: Any) -> None:
    _EPOCH[0] += 1


def _install_hooks() -> None:
    if not _HOOKS:
        _HOOKS.extend((
            _module.register_module_module_registration_hook(_bump),
            _module.register_module_parameter_registration_hook(_bump),
            _module.register_module_buffer_registration_hook(_bump),
        ))


class Slots(NamedTuple):
    """What :func:`slots_of` caches for a holder: its tensor ``slots``, the ``state`` slots a
    forward may write (:func:`state_slots`), its BatchNorms ``bns``, and every module it may call
    (``modules``, for :func:`refuse_compiled`), of which ``wrappers`` are ``torch.compile``'s."""

    slots: list[Slot]
    state: list[Slot]
    bns: list[_BatchNorm]
    modules: list[nn.Module]
    wrappers: list[nn.Module]


def slots_of(holder: Any) -> Slots:
    """The cached :class:`Slots` of ``holder`` (anything with ``owners()``: a unit, a segment),
    recomputed after any module, parameter or buffer registration (NOTE [ Slot cache ])."""
    cached = holder.__dict__.get("_slot_cache")
    if cached is not None and cached[0] == _EPOCH[0]:
        return cached[1]
    _install_hooks()  # before the first cached value: a hit implies they are in place
    owners = holder.owners()
    modules = _submodules(owners.modules)
    out = Slots(_slots(owners), state_slots(owners), batchnorms(owners.modules), modules,
                [m for m in modules if is_compiled_wrapper(m)])
    holder._slot_cache = (_EPOCH[0], out)
    return out


def is_compiled_wrapper(module: nn.Module) -> bool:
    """``torch.compile(module)``'s ``OptimizedModule`` (without importing torch._dynamo)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(
        module.__dict__.get("_modules", {}).get("_orig_mod"), nn.Module
    )


# NOTE [ Compiled units ]
# A module compiled after convert (``block.compile()``, ``torch.compile(block)`` put in its
# place), inside a unit of a reversible stage or a checkpointed segment, runs its forward as one
# compiled graph (no grad: an inference graph) and its recompute as another (a training graph,
# with BatchNorm's update switched off, or eagerly once dynamo's recompile limit is hit). Those
# differ in the last bits, and on CUDA eager and inductor draw different random numbers. A
# reversible stage rebuilds x_{k-1} from x_{k+1} and R(x_k), dividing by the coupling's small
# coefficient, so last-bit differences grow with every unit: the compiled blocks of ResNet-18
# (fp32, batch 4, 64 px, DropPath 0.3) gave a recompute 1.6 % off its forward and parameter
# gradients 30 % off (float64: 1e-14, which is why only a low-precision check shows it). Such a
# unit or segment is refused at its first call with grad, naming it; under no_grad (inference)
# it runs. revify.compile_units is the supported regional compile: there the forward runs the
# training graph its recompute runs (NOTE [ Regional compile ] in _compile.py). Module.compile
# sets a plain attribute, seen by no registration hook, so the flag is read at every call (a few
# attribute reads per module); wrappers are found with the slots.
_COMPILED = operator.attrgetter("_compiled_call_impl")


def refuse_compiled(what: str, slots: Slots) -> None:
    """Raise if a module ``what`` calls is compiled (NOTE [ Compiled units ])."""
    if not slots.wrappers and not any(map(_COMPILED, slots.modules)):
        return
    found = slots.wrappers or [m for m in slots.modules if m._compiled_call_impl is not None]
    kinds = ", ".join(dict.fromkeys(type(m).__name__ for m in found))
    raise RuntimeError(
        f"revify: {what} runs a module compiled after convert ({kinds}; Module.compile or "
        "torch.compile). Its recompute in backward must compute bitwise what its forward "
        "computed, which a compiled module's two graphs do not (NOTE [ Compiled units ] in "
        "revify/_replay.py). Compile the units with revify.compile_units(model) instead "
        "(their forward and recompute run one graph), or the whole converted model, "
        "torch.compile(model) (its converted trunk runs eagerly, the rest compiles), or "
        "revify.revert(model) before compiling its blocks; under torch.no_grad it runs."
    )


# Module hooks a converted trunk does not run are refused (NOTE [ Hooks on stage holders ] in
# _install.py); FSDP2's own hooks (fully_shard, driven by revify: NOTE [ FSDP2 ] in _fsdp.py),
# revify's own (the audit's, own_hook) and transformers' output-capture hooks (switched off
# inside a stage by _stacks.py) are not counted.
HOOK_DICTS = operator.attrgetter(
    "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"
)


def foreign_hooks(hooks: dict[int, Any]) -> bool:
    """Whether ``hooks`` holds a hook that is not FSDP2's own or transformers' output capture
    (inert inside a stage: ``_stacks`` refuses or switches off what it would capture)."""
    return any(
        type(getattr(h, "__self__", None)).__name__ != "FSDPState"
        and getattr(h, "__module__", None) != "transformers.utils.output_capturing"
        and not getattr(h, "revify_own", False)
        for h in hooks.values()
    )


def own_hook(fn: Any) -> Any:
    """Mark ``fn`` as one of revify's module hooks (the audit's), which read no tensor."""
    fn.revify_own = True
    return fn


# NOTE [ Forward hooks inside stages ]
# A reversible stage runs its units' forwards without grad and forms later states in the memory
# of earlier ones; a checkpointed segment runs its layers without grad. A module forward hook
# or pre-hook on a unit, on a layer inside one or a segment, or a global one, was handed
# tensors with no graph whose memory was then reused: a feature or distillation loss on them got
# no gradient (relative error 1.0 on the stem and first units) and read changed values (1.1).
# A stage or segment that calls a module with such a hook (not revify's own: foreign_hooks)
# therefore runs as ordinary autograd, as under revify.plain_autograd(): the same values, the
# hooks see tensors with their graph, fire once, and its activations are stored. It is warned
# once per stage or segment, naming the module; removing the hook brings the savings back at
# the next step. Looked up at every call with grad: a few C-level reads per module.
_PRE_HOOKS = operator.attrgetter("_forward_pre_hooks")
_POST_HOOKS = operator.attrgetter("_forward_hooks")


def hooked_globally() -> bool:
    """Whether a global module forward (pre-)hook that is not revify's own is registered."""
    return any(map(foreign_hooks, (_module._global_forward_pre_hooks,
                                   _module._global_forward_hooks)))


def forward_hooked(modules: Sequence[nn.Module], globals_checked: bool = False
                   ) -> nn.Module | str | None:
    """The first of ``modules`` with a forward (pre-)hook that is not revify's own, or
    ``"global"`` for a global one (:func:`hooked_globally`, not looked up again if
    ``globals_checked``); None if none has one."""
    if not globals_checked and hooked_globally():
        return "global"
    candidates = [*compress(modules, map(_PRE_HOOKS, modules)),
                  *compress(modules, map(_POST_HOOKS, modules))]
    for m in dict.fromkeys(candidates):  # a module with both kinds once
        pre = m._forward_pre_hooks
        if foreign_hooks(m._forward_hooks) or foreign_hooks(pre) and foreign_hooks(
            {k: h for k, h in pre.items() if not isinstance(h, _weight_hooks())}
        ):
            return m
    return None


@functools.cache
def _weight_hooks() -> tuple[type, ...]:
    """Pre-hooks that compute a module's weight from its parameters and read no input
    (torch.nn.utils' spectral_norm, weight_norm and pruning): they run in the recompute too."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return SpectralNorm, WeightNorm, BasePruningMethod


def warn_hooked(what: str, found: nn.Module | str, roots: Sequence[tuple[str, nn.Module]],
                warned: set[str]) -> None:
    """Warn, once per ``what`` (a stage or segment), that it runs as ordinary autograd because
    ``found`` (:func:`forward_hooked`; a module under one of ``roots``, ``(path, module)``)
    has a forward hook."""
    if found == "global":
        where = "a global module forward hook (nn.modules.module.register_module_forward_hook)"
    else:
        names = [".".join(filter(None, (path, n))) for path, r in roots
                 for n, m in r.named_modules() if m is found]
        where = f"a forward hook on {names[0]} ({type(found).__name__})" if names else \
            f"a forward hook on a {type(found).__name__}"
    message = (
        f"revify: {what} runs as ordinary autograd, storing its activations, because of {where}: "
        "inside a reversible stage or checkpointed segment a hook would be handed tensors "
        "without their graph (NOTE [ Forward hooks inside stages ] in revify/_replay.py). "
        "Remove the hook to get the memory savings back, or register it outside the stage."
    )
    if message not in warned:
        warned.add(message)
        warnings.warn(message, stacklevel=4)


def _slot_values(slots: Sequence[Slot]) -> list[Any]:
    """What each of ``slots`` holds now (None where nothing), without a Python-level loop."""
    return list(map(dict.get, *zip(*slots, strict=True))) if slots else []


def read_slots(slots: Sequence[Slot], grad_only: bool = False) -> list[Tensor]:
    """The tensors in ``slots`` now, once each (only those requiring grad if ``grad_only``).
    Built from C-level iterators: this runs for every unit twice a step."""
    values = _slot_values(slots)
    keep = map(getattr, values, repeat("requires_grad"), repeat(False)) if grad_only else \
        map(isinstance, values, repeat(Tensor))
    kept = list(compress(values, keep))
    return list(dict(zip(map(id, kept), kept, strict=True)).values())  # once each


# NOTE [ Buffers a forward writes ]
# Besides BatchNorm, modules write buffers in forward: InstanceNorm's and EvoNorm's running
# statistics, spectral_norm's power-iteration vectors, counters (``self.count += 1``). A
# recompute must not write them a second time, and should read them as the forward did. Each
# forward call that will be recomputed watches its modules' buffers (BatchNorm statistics
# excepted: frozen_running_stats switches their update off, which costs nothing): a buffer whose
# version counter moved, or that was replaced, was written. Copies of the buffers known to be
# written (all buffers the first time a unit runs) are taken before the call and kept for the
# recompute; the recompute then reads a fresh copy of that value while the buffer itself keeps
# what the forward left. Writes through ``.data`` do not move the version counter and are missed.

_BN_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def state_slots(owners: Owners) -> list[Slot]:
    """The buffer slots of ``owners`` a forward may write: not BatchNorm statistics, nor
    buffers requiring grad (those are stood in for, NOTE [ Recompute leaves ])."""
    out: list[Slot] = []
    for sub in _submodules(owners.modules):
        bn = isinstance(sub, _BatchNorm)
        for k, t in sub._buffers.items():
            if t is not None and not t.requires_grad and not (bn and k in _BN_STATS):
                out.append((sub._buffers, k))
    for owner, name in owners.attrs:
        t = owner._buffers.get(name)
        held = any(d is owner._buffers and k == name for d, k in out)
        if t is not None and not t.requires_grad and not held:
            out.append((owner._buffers, name))
    return out


class Written(NamedTuple):
    """A buffer a forward call wrote and the value the recompute must read (``None``: a copy
    of the current one, as the value from before the call was not kept)."""

    slot: Slot
    before: Tensor | None


_NOTHING: frozenset[int] = frozenset()


class BufferWatch:
    """Finds the buffers one forward call writes (NOTE [ Buffers a forward writes ]).

    ``known`` holds the positions in ``slots`` of the buffers earlier calls of the same
    function wrote, or is ``None`` before the first: then every buffer is copied.
    """

    __slots__ = ("slots", "known", "start")

    def __init__(self, slots: list[Slot], known: frozenset[int] | None) -> None:
        self.slots, self.known = slots, known
        self.start = [
            (d[k], d[k]._version, d[k].clone() if known is None or i in known else None)
            for i, (d, k) in enumerate(slots)
        ]

    def written(self) -> tuple[list[Written], frozenset[int]]:
        """The buffers written since construction, and the updated ``known``."""
        if not self.slots:  # most units: no buffer but BatchNorm statistics
            return [], _NOTHING
        out: list[Written] = []
        found: set[int] = set()
        for i, ((d, k), (t, version, copy)) in enumerate(zip(self.slots, self.start, strict=True)):
            if d.get(k) is not t or t._version != version:
                out.append(Written((d, k), copy))
                found.add(i)
        self.start = []
        return out, (self.known or frozenset()) | found


class BufferSnapshot:
    """Copies of the buffers in ``slots``, to put back by :meth:`restore` (a forward redone
    from its start must find them as the first attempt did)."""

    __slots__ = ("kept",)

    def __init__(self, slots: list[Slot]) -> None:
        self.kept = [(d, k, d[k], d[k].clone()) for d, k in slots]

    def restore(self) -> None:
        with torch.no_grad():
            for d, k, t, copy in self.kept:
                d[k] = t
                t.copy_(copy)


def _swap_in(written: Sequence[Written]) -> list[tuple[dict[str, Any], str, Tensor]]:
    """Make each written buffer read as before the forward call (or as now, when that was not
    kept), in a copy; returns what :func:`_swap_back` puts back."""
    if not written:
        return []
    kept = [(d, k, d[k]) for (d, k), _ in written]
    with torch.no_grad():
        for ((d, k), before), (_, _, now) in zip(written, kept, strict=True):
            d[k] = (now if before is None else before).clone()
    return kept


def _swap_back(kept: list[tuple[dict[str, Any], str, Tensor]]) -> None:
    for d, k, now in kept:
        d[k] = now


# NOTE [ Uncached casts ]
# Under autocast, torch caches the bf16 copy of every fp32 leaf parameter it casts until the
# outermost autocast region ends, so that a weight read twice is cast once. A stage or segment
# forward runs without grad and stores nothing, yet the cache kept every conv weight's copy of
# the whole forward alive: 115 MiB at ResNet-152's simulated bf16 peak (the end of the forward,
# issue 12). Inside those forwards the cache is off: each copy is freed after its op, a weight
# read twice is cast twice (the same values), and the forward's state records it off, so the
# recompute casts as the forward did.


class UncachedCasts:
    """While entered, autocast caches no casts (NOTE [ Uncached casts ])."""

    __slots__ = ("was",)

    def __enter__(self) -> None:
        self.was = torch.is_autocast_cache_enabled()
        if self.was:
            torch.set_autocast_cache_enabled(False)

    def __exit__(self, *exc: Any) -> None:
        if self.was:
            torch.set_autocast_cache_enabled(True)


class Recompute:
    """The context one recompute runs in, entered and left as one object: grad mode ``grad``
    (None: as it is), the forward's RNG and autocast ``state`` (:class:`_ForwardState`), the
    BatchNorm statistics of ``bns`` frozen (:func:`_freeze`), the buffers the forward
    ``written`` as it read them (NOTE [ Buffers a forward writes ]) and stand-ins for
    ``tensors`` in ``slots`` (NOTE [ Recompute leaves ]), which ``__enter__`` returns.

    These were five generator-based context managers, ~600 bytecodes of host time per unit
    backward at every step (issue 14). Leaving puts everything back in reverse order, also
    when the body raised; a tensor replaced during the body raises after that.
    """

    __slots__ = ("what", "state", "bns", "written", "slots", "tensors", "needs", "linked",
                 "grad", "_undo")

    def __init__(
        self, what: str, state: _ForwardState | None, bns: Sequence[_BatchNorm] = (),
        written: Sequence[Written] = (), slots: Sequence[Slot] = (),
        tensors: Sequence[Tensor] = (), needs: Sequence[bool] = (), linked: bool = False,
        grad: bool | None = True,
    ) -> None:
        self.what, self.state, self.bns, self.written = what, state, bns, written
        self.slots, self.tensors, self.needs, self.linked = slots, tensors, needs, linked
        self.grad = grad

    def __enter__(self) -> list[Tensor]:
        undo: list[Any] = [torch.is_grad_enabled(), None, [], [], None]
        self._undo = undo
        if self.grad is not None:
            torch._C._set_grad_enabled(self.grad)
        try:
            if self.state is not None:
                undo[1] = self.state.enter()
            undo[2] = _freeze(self.bns)
            undo[3] = _swap_in(self.written)
            leaves, undo[4] = _stand_in(self.what, self.slots, self.tensors, self.needs,
                                        self.linked)
        except BaseException:
            self._leave(False)
            raise
        return leaves

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._leave(exc_type is None)

    def _leave(self, check: bool) -> None:
        grad, entered, switched, kept, stand = self._undo
        try:
            if stand is not None:
                _stand_back(self.what, self.slots, stand, check)
        finally:
            _swap_back(kept)
            _unfreeze(switched)
            if entered is not None:
                self.state.exit(entered)
            torch._C._set_grad_enabled(grad)


_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)


def vjp(outputs: Sequence[Any], inputs: Sequence[Tensor], grads: Sequence[Tensor],
        create_graph: bool = False) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grads, allow_unused=True)`` for a recompute's
    outputs (tensors or gradient edges) and gradients of their shapes: the engine is called
    directly where torch has the helper ``grad`` calls, without its argument normalisation and
    checks (~450 bytecodes per call; issue 14)."""
    if _RUN_BACKWARD is None or not inputs:  # grad() raises on no inputs, as it should
        return torch.autograd.grad(outputs, inputs, grads, allow_unused=True,
                                   create_graph=create_graph)
    return _RUN_BACKWARD(tuple(outputs), tuple(grads), create_graph, create_graph,
                         tuple(inputs), True, accumulate_grad=False)


# NOTE [ Mismatch check ]
# A recompute that computes something else than its forward (randomness drawn from Python's
# ``random`` or numpy, a Python counter or attribute that forward changes, state written through
# ``.data``) gives wrong gradients that nothing else reports. Reversible stages and checkpointed
# segments therefore compare, on some backward passes, what the recompute rebuilt with what the
# forward computed: the stage's reconstruction error max|x_{-1} - x_0| / max|x_0| (it is
# computed at every backward anyway) and, per rebuilt state, the same measure on a sample of
# about 4096 elements kept by the forward, which names the first unit whose recompute differed;
# a segment compares a sample of its outputs. Reading the result synchronises with the device,
# so it is done on the first _CHECK_FIRST passes and then every _CHECK_EVERY-th. Honest rounding
# stays far below the tolerance: on timm resnet18/50/101/152, convnext_atto at 64 px, batch 4,
# random weights with non-zero branches, the largest stage reconstruction error was 1.1e-3 in
# fp32 (resnet152's 35-unit layer3; 2.5e-6 at 5 units), 3e-7 under bf16 autocast and 5e-12 in
# float64, while a unit skipped by random.random() or changed by a call counter gave 0.25-1.3.
# ``on_mismatch`` says what a detection does: "warn" (once per stage or segment), "raise", or
# "ignore" (no check at all).

_CHECK_FIRST, _CHECK_EVERY = 10, 50
_SAMPLES = 4096
MISMATCH_MODES = ("warn", "raise", "ignore")


class MismatchOptions:
    """What a stage or segment does when its recompute differs from its forward (NOTE
    [ Mismatch check ]): ``on_mismatch`` is "warn" (the default, once), "raise" or "ignore";
    ``mismatch_tolerance`` overrides the tolerance chosen by precision (1e-6 in float64, 1e-2
    in float32, 5e-2 in half precision or under half-precision autocast)."""

    name: str
    _on_mismatch = "warn"
    mismatch_tolerance: float | None = None
    checked_passes = 0  # passes that could have been checked, counted by RecomputeCheck.due
    mismatch_warned = False

    @property
    def on_mismatch(self) -> str:
        return self._on_mismatch

    @on_mismatch.setter
    def on_mismatch(self, value: str) -> None:
        if value not in MISMATCH_MODES:
            raise ValueError(
                f"revify: {type(self).__name__} {self.name}: on_mismatch must be one of "
                f"{', '.join(map(repr, MISMATCH_MODES))}, got {value!r}"
            )
        self._on_mismatch = value


def default_tolerance(dtype: torch.dtype, device_type: str) -> float:
    """The mismatch tolerance for a computation in ``dtype`` (or autocast's dtype)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    return {torch.float64: 1e-6, torch.float32: 1e-2}.get(dtype, 5e-2)


def sampled(x: Tensor) -> Tensor:
    """A view of about 4096 elements of ``x`` on a regular grid of logical positions (the same
    whatever the memory layout)."""
    if x.dim() == 0:
        return x.reshape(1)
    per = max(1, round(_SAMPLES ** (1 / x.dim())))
    return x[tuple(slice(None, None, max(1, n // per)) for n in x.shape)]


def _rel_max(x: Tensor, ref: Tensor) -> Tensor:
    """``max|x - ref| / max|ref|`` (0-dim, on the device)."""
    d = torch.sub(x, ref).abs_().amax()
    return d / ref.abs().amax().clamp_min(torch.finfo(ref.dtype).tiny)


class RecomputeCheck:
    """One pass of the mismatch check (NOTE [ Mismatch check ]): samples of forward values by
    key, and the deviations of the recomputed values from them, kept on the device until
    :meth:`worst` reads them all at once."""

    __slots__ = ("tolerance", "samples", "deviations")

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.samples: dict[Any, Tensor] = {}
        self.deviations: dict[Any, Tensor] = {}

    @staticmethod
    def due(owner: Any, x: Tensor) -> RecomputeCheck | None:
        """A check for this pass of ``owner`` (a stage or segment with ``on_mismatch``,
        ``mismatch_tolerance`` and a pass count ``checked_passes``), or None."""
        if owner.on_mismatch == "ignore" or is_fake(x) or x.is_meta:  # shape-only passes
            return None
        owner.checked_passes += 1
        n = owner.checked_passes
        if n > _CHECK_FIRST and n % _CHECK_EVERY:
            return None
        tol = owner.mismatch_tolerance
        return RecomputeCheck(default_tolerance(x.dtype, x.device.type) if tol is None else tol)

    def record(self, key: Any, x: Tensor) -> None:
        if x.is_floating_point():
            self.samples[key] = sampled(x.detach()).clone()

    def compare(self, key: Any, x: Tensor) -> None:
        ref = self.samples.pop(key, None)
        if ref is not None:
            self.deviations[key] = _rel_max(sampled(x.detach()).to(ref.dtype), ref)

    def worst(self, extra: dict[Any, Tensor] | None = None) -> dict[Any, float]:
        """The deviations above the tolerance (NaN is not one), read with one device sync."""
        devs = {**self.deviations, **(extra or {})}
        self.samples.clear()
        self.deviations.clear()
        if not devs:
            return {}
        values = torch.stack([d.detach().float().reshape(()) for d in devs.values()]).tolist()
        return {k: v for k, v in zip(devs, values, strict=True) if v > self.tolerance}


MISMATCH_CAUSES = (
    "randomness not drawn from torch's generators (Python's random, numpy), or module state "
    "that forward changes outside buffers (a Python counter, an attribute set in forward, a "
    "write through .data); draw random numbers with torch and keep state in buffers, or "
    "exclude the module from conversion, or use revify.plain_autograd() for such steps"
)


def report_mismatch(
    owner: Any, what: str, value: float, tolerance: float, cause: str = MISMATCH_CAUSES
) -> None:
    """Warn (once per ``owner``) or raise, as ``owner.on_mismatch`` says, that ``what``'s
    recompute in backward differed from its forward by ``value``; ``cause``: the likely ones."""
    msg = (
        f"revify: {what}: the activations recomputed in backward differ from the forward's "
        f"(relative difference {value:.3g}, tolerance {tolerance:.3g}), so this step's "
        f"gradients are wrong. Likely cause: {cause}. revify.set_on_mismatch(model, 'raise') "
        "makes this an error, 'ignore' turns the check off"
    )
    if owner.on_mismatch == "raise":
        raise RuntimeError(msg)
    if not owner.mismatch_warned:
        owner.mismatch_warned = True
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
