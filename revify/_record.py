"""What a converted model's state dict says about the function its weights were trained for.

NOTE [ Checkpoint record ]
A converted model computes a different function of the same weights than the original
network (the RevNet coupling very much so, the faithful one by its 1/64 term), so weights
trained converted and then loaded into an unconverted model, or into one converted with other
coefficients, compute something else without a word (seen: 48 % -> 9.4 % accuracy). The keys
of ``state_dict()`` must not change (checkpoints load both ways), so the coupling is written
where torch keeps per-module facts about a state dict: ``state_dict._metadata[prefix]``, the
dict that holds each module's ``version``. torch.save and ``torch.load(weights_only=True)``
keep it; formats that store tensors only (safetensors) drop it, and then nothing is known.

The record of the module holding a plan is ``{"revify": {...}}`` with the revify version, the
options ``convert`` was called with, and each stage's coefficients at saving time (a
``revify.Schedule`` or a user may have moved them). :func:`revify.load_state_dict` converts a
fresh model with those options and coefficients and then loads the weights; loading a recorded
state dict into a converted model whose coefficients differ warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import nn

KEY = "revify"
FORMAT = 1
_OPTIONS = ("coupling", "alpha", "beta", "exact", "checkpoint_stem", "checkpoint_transitions",
            "min_units")


class Source(NamedTuple):
    """What a converted module runs: its plan's method (``"stacks"`` for layer stacks), the
    options it was converted with, and its stages."""

    method: str
    options: dict[str, Any]
    stages: list[Any]


def source(module: nn.Module) -> Source | None:
    """The conversion installed on ``module`` itself (an fx plan or layer stacks), if any."""
    plan = module.__dict__.get("_revify_plan")
    if plan is not None:
        return Source(plan.method, plan.options, list(plan.stages))
    stacks = module.__dict__.get("_revify_stacks")
    if stacks:
        options = module.__dict__.get("_revify_stack_options", {})
        return Source("stacks", options, [st.stage for st in stacks])
    return None


def _stage_coefficients(src: Source) -> dict[str, list[Any]]:
    return {st.name: [st.alpha, st.beta, st.exact] for st in src.stages}


def make_record(src: Source) -> dict[str, Any]:
    """The record of one converted module (plain Python values, so any pickler keeps it)."""
    from . import __version__

    return {
        "format": FORMAT,
        "version": __version__,
        "method": src.method,
        "options": {k: src.options[k] for k in _OPTIONS if k in src.options},
        "stages": _stage_coefficients(src),
        "units": {st.name: [u.name for u in st.units] for st in src.stages},
    }


def _save_hook(module: nn.Module, state_dict: Any, prefix: str, local_metadata: dict) -> None:
    src = source(module)
    if src is not None:
        local_metadata[KEY] = make_record(src)


def _load_hook(module: nn.Module, state_dict: Any, prefix: str, local_metadata: dict,
               *args: Any) -> None:
    src = source(module)
    record = local_metadata.get(KEY) if isinstance(local_metadata, Mapping) else None
    if src is None or not isinstance(record, Mapping):
        return  # weights of an unconverted model (a pretrained checkpoint): nothing to say
    ours = _stage_coefficients(src)
    theirs = record.get("stages", {})
    differ = [
        f"{name} (saved alpha={theirs[name][0]:.6g}, beta={theirs[name][1]:.6g}; "
        f"here alpha={ours[name][0]:.6g}, beta={ours[name][1]:.6g})"
        for name in ours
        if name in theirs and list(theirs[name][:2]) != list(ours[name][:2])
    ]
    missing = sorted(set(theirs) ^ set(ours))
    if differ or missing:
        where = prefix.rstrip(".") or type(module).__name__
        what = "; ".join(differ + ([f"stages not in both: {', '.join(missing)}"] if missing
                                    else []))
        warnings.warn(
            f"revify: the state dict loaded into {where} was saved from a model converted with "
            f"other coefficients, so these weights compute a different function here: {what}. "
            "Use revify.load_state_dict(fresh_model, state_dict) to convert as they were "
            "trained (NOTE [ Checkpoint record ] in revify/_record.py)",
            stacklevel=3,
        )


def install(module: nn.Module) -> None:
    """Hooks writing and checking the record of ``module`` (which holds a plan).

    Plain module-level functions, so a pickled or deep-copied model keeps them."""
    module.register_state_dict_post_hook(_save_hook)
    module.register_load_state_dict_pre_hook(_load_hook)


def is_recorded(module: nn.Module) -> bool:
    """Whether ``module``'s state dict carries a record (``convert`` was called on it)."""
    return any(hook is _save_hook for hook in module._state_dict_hooks.values())


def uninstall(module: nn.Module) -> None:
    """Remove what :func:`install` registered (``revert``)."""
    for key, hook in list(module._state_dict_hooks.items()):
        if hook is _save_hook:
            del module._state_dict_hooks[key]
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        if getattr(hook, "hook", None) is _load_hook:
            del module._load_state_dict_pre_hooks[key]


def records(state_dict: Any) -> dict[str, dict[str, Any]]:
    """``{module path: record}`` of every converted module a state dict was saved from."""
    meta = getattr(state_dict, "_metadata", None) or {}
    out = {}
    for prefix, local in meta.items():
        record = local.get(KEY) if isinstance(local, Mapping) else None
        if isinstance(record, Mapping):
            out[prefix] = dict(record)
    return out
