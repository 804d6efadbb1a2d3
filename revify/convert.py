"""``revify.convert``: the public entry points of the pass that turns residual chains into
reversible stages.

:func:`convert` checks its options, plans the model's trunk (``_plan.py``) and installs the
plan on the model (``_install.py``); when the whole trunk cannot be traced it converts the
submodules that can, and a Hugging Face model's layer stacks go to ``_stacks.py``.
:func:`revert`, :func:`load_state_dict`, :func:`stages`, :func:`plans` and
:func:`set_on_mismatch` work on a converted model. The named couplings live here too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _fsdp, _record, _stacks

# Beside what this module uses, the imports below name the classes that whole-model pickles
# (``torch.save(model)``) made before planning and installing moved out of this module look
# for here, so that those pickles load (hence F401).
from ._install import (  # noqa: F401
    _GradCheckpointingIgnored,
    _guard_units,
    _install,
    _install_containers,
    _Intermediates,
    _LazyContainer,
    _NotScriptable,
    _Rewritten,
)
from ._plan import (  # noqa: F401
    _PLAN,
    Block,
    ConversionError,
    Plan,
    ReportLine,
    _build_plan,
    _Ref,
    _Step,
    _Untraceable,
)
from ._replay import is_compiled_wrapper
from ._trace import entry_method, required_args, training_kept
from .coupling import ReversibleStage

__all__ = [
    "convert", "revert", "load_state_dict", "stages", "set_on_mismatch", "ConversionError",
    "COUPLINGS",
]


def plans(model: nn.Module) -> list[tuple[str, Plan]]:
    """``(module path, plan)`` of every converted module in ``model`` (the model itself, or its
    submodules when the whole model could not be traced)."""
    return [(p, m.__dict__[_PLAN]) for p, m in model.named_modules() if _PLAN in m.__dict__]


def is_converted(model: nn.Module) -> bool:
    return bool(plans(model)) or bool(_stacks.stacks_of(model))


def stages(model: nn.Module) -> list[ReversibleStage]:
    """The reversible stages of a converted model, in order (set ``alpha``/``beta`` on them)."""
    out: dict[int, ReversibleStage] = {}
    for _, plan in plans(model):
        for st in plan.stages:
            out.setdefault(id(st), st)
    for stack in _stacks.stacks_of(model):
        out.setdefault(id(stack.stage), stack.stage)
    return list(out.values())


def set_on_mismatch(
    model: nn.Module, mode: str, tolerance: float | None = None
) -> nn.Module:
    """Set what every reversible stage and checkpointed segment of ``model`` does when its
    recompute in backward differs from its forward, which makes that step's gradients wrong:
    ``"warn"`` (the default, once per stage or segment), ``"raise"`` (a ``RuntimeError`` from
    ``backward``) or ``"ignore"`` (no check). ``tolerance`` overrides the relative difference
    allowed (None: by precision, 1e-2 in float32). The check runs on the first 10 backward
    passes and every 50th after (NOTE [ Mismatch check ] in ``_replay.py``). Returns ``model``.
    """
    targets: list[Any] = [*stages(model)]
    for _, plan in plans(model):
        targets += [seg for seg in plan.segments if seg.checkpoint]
    for t in targets:
        t.on_mismatch = mode
        t.mismatch_tolerance = tolerance
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: every converted module runs its original code again.

    The reverted model computes the original network, ``x_{k+1} = x_k + R_k(x_k)``, of the
    current weights. Weights trained converted were trained for the coupling instead: with the
    faithful coupling the two differ by its ``(x_{k-1} - x_k)/64`` term (a few percent of the
    output, docs/finetune.md); with any other coefficients they differ much more, and ``revert``
    warns, naming the stages."""
    changed = [
        f"{st.name} (alpha={st.alpha:.6g}, beta={st.beta:.6g})"
        for st in stages(model)
        if (st.alpha, st.beta) != COUPLINGS["faithful"]
    ]
    if changed:
        warnings.warn(
            "revify.revert: the reverted model computes the original network x + R(x), not "
            f"the coupling its stages ran: {', '.join(changed)}; weights trained converted "
            "compute a different function after revert (keep the model converted for "
            "inference, or save it and use revify.load_state_dict)",
            stacklevel=2,
        )
    _stacks.uninstall(model)
    for _, m in model.named_modules():
        if isinstance(m.__dict__.get("forward"), _LazyContainer):
            del m.__dict__["forward"]
        if isinstance(m.__dict__.get("__prepare_scriptable__"), _NotScriptable):
            del m.__dict__["__prepare_scriptable__"]
        plan = m.__dict__.pop(_PLAN, None)
        if plan is not None:
            _guard_units(plan, install=False)
            m.__dict__.pop(plan.method, None)
            m.__dict__.pop("set_grad_checkpointing", None)
            m.__dict__.pop("forward_intermediates", None)
        _record.uninstall(m)
    return model


def load_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    example_input: Tensor | Sequence[Any] | None = None,
    *,
    strict: bool = True,
) -> nn.Module:
    """Convert ``model`` as the model that saved ``state_dict`` was converted, then load it.

    A converted model's ``state_dict()`` records its coupling options and every stage's
    coefficients in the state dict's metadata (``state_dict._metadata``, kept by ``torch.save``
    and ``torch.load``; NOTE [ Checkpoint record ] in ``_record.py``), so that weights trained
    converted are used with the function they were trained for::

        torch.save(converted.state_dict(), "ckpt.pt")
        model = revify.load_state_dict(timm.create_model("resnet50"), torch.load("ckpt.pt"))

    ``model`` is a fresh (unconverted) instance of the same architecture, or one converted with
    the same options. ``example_input`` is passed to :func:`convert`. Returns ``model``.

    Raises:
        ValueError: the state dict records no conversion (saved unconverted, or in a format
            that keeps tensors only, such as safetensors), or ``model`` is converted
            differently, or converts into other stages than the saved model had.
    """
    recs = _record.records(state_dict)
    if not recs:
        raise ValueError(
            "revify.load_state_dict: the state dict records no conversion: it was saved from an "
            "unconverted model, or in a format that keeps tensors only (safetensors drops "
            "torch's state-dict metadata). Load it with model.load_state_dict(state_dict) and "
            "convert with the coupling it was trained with: revify.convert(model, coupling=...)"
        )
    newer = [p for p, r in recs.items() if r.get("format", 0) > _record.FORMAT]
    if newer:
        raise ValueError(
            f"revify.load_state_dict: the record of {newer[0] or 'the model'} was written by a "
            f"newer revify ({recs[newer[0]].get('version')}); upgrade revify"
        )
    options = {repr(sorted(r["options"].items())): r["options"] for r in recs.values()}
    if len(options) > 1:
        raise ValueError(
            "revify.load_state_dict: the state dict's converted modules "
            f"({', '.join(p or '<root>' for p in recs)}) were converted with different "
            "options; convert each of them yourself and load with model.load_state_dict"
        )
    opts = dict(next(iter(options.values())))
    fresh = not is_converted(model)
    if fresh:
        named = opts.get("coupling")
        convert(
            model,
            example_input,
            coupling=named if named in COUPLINGS else "faithful",
            alpha=opts["alpha"],
            beta=opts["beta"],
            exact=opts["exact"],
            checkpoint_stem=opts.get("checkpoint_stem", True),
            checkpoint_transitions=opts.get("checkpoint_transitions", True),
            min_units=opts.get("min_units", 1),
        )
    try:
        _adopt(model, recs, opts, state_dict, strict)
    except Exception:
        if fresh:  # leave the model as it was given
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                revert(model)
        raise
    return model


def _adopt(model: nn.Module, recs: dict[str, dict[str, Any]], opts: dict[str, Any],
           state_dict: Mapping[str, Any], strict: bool) -> None:
    """Check that ``model`` converted as the records say, set the saved coefficients, load."""
    ours = {p: _record.source(m) for p, m in model.named_modules() if _record.is_recorded(m)}
    for path, src in ours.items():
        mismatched = [k for k, v in opts.items() if k != "coupling" and src.options.get(k) != v]
        if mismatched:
            raise ValueError(
                f"revify.load_state_dict: {path or type(model).__name__} is already converted "
                f"with other options ({', '.join(mismatched)}); pass a fresh model"
            )
    if set(ours) != set(recs):
        raise ValueError(
            "revify.load_state_dict: the saved model converted "
            f"{sorted(p or '<root>' for p in recs)}, this one {sorted(p or '<root>' for p in ours)}"
            "; is it the same architecture (and the same example input shape)?"
        )
    for path, src in ours.items():
        saved = recs[path]["stages"]
        units = {st.name: [u.name for u in st.units] for st in src.stages}
        if sorted(saved) != sorted(units) or recs[path].get("units", units) != units:
            raise ValueError(
                f"revify.load_state_dict: {path or type(model).__name__} was saved with stages "
                f"{recs[path].get('units', sorted(saved))} but converts into {units}; is it the "
                "same architecture?"
            )
        for st in src.stages:
            alpha, beta, exact = saved[st.name]
            if bool(exact) != st.exact:
                raise ValueError(
                    f"revify.load_state_dict: stage {st.name} was saved with exact={exact}"
                )
            st.alpha, st.beta = alpha, beta
    model.load_state_dict(state_dict, strict=strict)


def _default_example(model: nn.Module) -> Tensor:
    """A batch of 2 zeros in the shape ``model`` was built for, on its device and in its dtype.

    The spatial size is the one the model was configured with where it says (a timm ViT or
    Swin built with ``img_size=32`` has ``patch_embed.img_size == (32, 32)``, while its
    ``pretrained_cfg['input_size']`` still says 224; torchvision's ViT has ``image_size``),
    else timm's ``pretrained_cfg``, else
    224x224; the channels are the first convolution's input channels (``in_chans=1``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    channels, *spatial = size if size is not None else (3, 224, 224)
    configured = getattr(getattr(model, "patch_embed", None), "img_size", None)
    for name in ("img_size", "image_size"):  # timm's, torchvision ViT's
        configured = configured if configured is not None else getattr(model, name, None)
    if isinstance(configured, int):
        configured = (configured, configured)
    if isinstance(configured, (tuple, list)) and all(isinstance(v, int) for v in configured):
        spatial = list(configured)
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is not None:
        channels, dims = conv.in_channels, conv.weight.dim() - 2
        spatial = spatial if len(spatial) == dims else [224] * dims
    first = next((t for t in model.parameters() if t.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    return torch.zeros(2, channels, *spatial, device=device, dtype=dtype)


# The named couplings: fine-tuning pretrained weights keeps their function with "faithful",
# x_{k+1} = x_k + R_k(x_k) + (x_{k-1} - x_k) / 64; "revnet" (y1 = x1 + F(x2), y2 = x2 + G(y1))
# computes another function of the same weights, for training from scratch.
COUPLINGS: dict[str, tuple[float, float]] = {
    "faithful": (63 / 64, 1 / 64),
    "revnet": (0.0, 1.0),
}


def _exact_supported(beta: float) -> bool:
    """Whether exact streams can run ``beta``: ``1/d`` for an integer d in 1..256."""
    d = round(1.0 / beta) if beta else 0
    return 1 <= d <= 256 and abs(1.0 / beta - d) <= 1e-9


def _coupling_options(
    coupling: str, alpha: float | None, beta: float | None, exact: bool | None
) -> dict[str, Any]:
    """``alpha``, ``beta``, ``exact`` and the coupling's name (``"custom"`` when overridden)."""
    if coupling not in COUPLINGS:
        raise ValueError(
            f"revify.convert: unknown coupling {coupling!r}; choose one of "
            f"{', '.join(map(repr, COUPLINGS))} (or give alpha= and beta=)"
        )
    chosen = dict(zip(("alpha", "beta"), COUPLINGS[coupling], strict=True))
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"revify.convert: {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"revify.convert: {name} must be finite, got {value!r}")
            chosen[name] = float(value)
    if exact is None:  # a beta below 1 divides float rounding by beta at every inverse step
        exact = chosen["beta"] < 1 and _exact_supported(chosen["beta"])
    chosen["exact"] = bool(exact)
    named = [n for n, (a, b) in COUPLINGS.items() if (a, b) == (chosen["alpha"], chosen["beta"])]
    chosen["coupling"] = named[0] if named and exact == (named[0] == "faithful") else "custom"
    return chosen


def convert(
    model: nn.Module,
    example_input: Tensor | Sequence[Any] | dict[str, Any] | None = None,
    *,
    coupling: str = "faithful",
    alpha: float | None = None,
    beta: float | None = None,
    exact: bool | None = None,
    checkpoint_stem: bool = True,
    checkpoint_transitions: bool = True,
    min_units: int = 1,
    strict: bool = False,
    plan: Any = None,
    memory_budget: int | float | str | None = None,
) -> nn.Module:
    """Make training ``model`` store far less activation memory, in place; returns ``model``.

    Chains of stride-1 identity residual units (``y = x + F(x)``, same shape in and out) become
    reversible two-stream couplings ``x_{k+1} = beta*x_{k-1} + alpha*x_k + R_k(x_k)`` that keep
    only their last two states and rebuild the rest in backward. The layers between chains
    (stem, downsampling transitions) are checkpointed: only their inputs are kept. The same
    ``Parameter`` objects stay in the model and ``state_dict()`` keys are unchanged, so an
    optimizer built before conversion keeps working and checkpoints load both ways.

    The default coupling, ``"faithful"`` (``alpha=63/64, beta=1/64`` on exact fixed-point
    streams), stays close to the original network, so a pretrained backbone keeps what it
    computes (``x_{k+1} = x_k + R_k(x_k) + (x_{k-1} - x_k)/64``) and fine-tunes like the
    original. ``coupling="revnet"`` (``alpha=0, beta=1``) computes a different function
    whenever a stage has more than one unit (unit k+1 sees ``x_{k-1} + R_k(x_k)``): for
    training from scratch. Under ``torch.no_grad()`` the model runs a plain forward;
    :func:`revify.plain_autograd` runs the same function with ordinary autograd.

    Args:
        model: any ``nn.Module`` whose trunk torch.fx can trace (timm's leaf conventions apply).
        example_input: an input (or tuple of inputs, or dict of named inputs) of the trunk
            method, used only for shapes, on fake tensors. Default: zeros of the shape the
            model was built for (timm's ``patch_embed.img_size``, else
            ``pretrained_cfg['input_size']``, else 224x224, with the first convolution's input
            channels), on the model's device. For a Hugging Face ``transformers`` model it is
            the keyword inputs of one eager run (``dict(input_ids=ids, attention_mask=m)``;
            default from its config), and its layer stacks become the stages (NOTE [ Layer
            stacks ] in ``_stacks.py``; ``checkpoint_*`` and ``strict`` do not apply: nothing
            to convert raises).
        coupling: ``"faithful"`` (default) or ``"revnet"``, see above.
        alpha, beta: override the coupling's coefficients for every stage. ``alpha=1, beta=1``
            grows like Fibonacci and loses precision. A ``beta`` below 1 needs ``exact=True``
            (dividing by it amplifies float rounding like ``beta^-n``).
        exact: keep the streams on a fixed-point grid, so that reconstruction is exact at any
            depth and any ``beta = 1/d`` (d an integer up to 256); costs ceil(log2 d) bits per
            element per unit (NOTE [ Exact streams ] in _exact.py). Default: True when
            ``beta < 1`` is such a ``1/d`` (the faithful coupling), else False.
        checkpoint_stem: checkpoint the layers before the first reversible stage.
        checkpoint_transitions: checkpoint the layers between stages (downsampling).
        min_units: shortest chain worth a reversible stage.
        strict: raise :class:`ConversionError` instead of warning when nothing is converted.
        plan: a :class:`revify.MemoryPlan` (or its dict): a treatment per stage and segment
            (reversible, checkpointed per unit, stored), e.g. from :func:`revify.plan_memory`.
            Treatments change what a training step stores, never what the model computes.
        memory_budget: choose the fastest plan whose simulated training peak for a batch of
            ``example_input``'s shape fits: bytes, a string such as ``"24GiB"``, or a float in
            (0, 1], a fraction of the original model's peak (NOTE [ Planning ] in
            planner.py; weights, gradients and SGD momentum counted). None: the
            minimum-memory plan (every chain reversible, stem and transitions checkpointed).
            :func:`revify.memory_plan` shows what was chosen.

    Raises:
        ConversionError: the trunk cannot be traced, or depends on ``self.training`` in a way
            tracing would freeze, or (``strict``) it has no residual chain to convert.
        ValueError: an unknown ``coupling``, or coefficients that are not finite numbers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revify.convert: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"revify.convert: {getattr(model, 'original_name', type(model).__name__)} is a "
            "TorchScript module; convert the eager module before scripting (torch.fx cannot "
            "trace TorchScript)"
        )
    if is_compiled_wrapper(model):
        # torch.compile(model): convert the module it wraps; the wrapper then compiles the
        # converted model (its trunk runs eagerly, NOTE [ torch.compile ] in _install.py).
        convert(model._orig_mod, example_input, coupling=coupling, alpha=alpha, beta=beta,
                exact=exact, checkpoint_stem=checkpoint_stem,
                checkpoint_transitions=checkpoint_transitions, min_units=min_units,
                strict=strict, plan=plan, memory_budget=memory_budget)
        return model
    compiled = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if is_compiled_wrapper(m) or m._compiled_call_impl is not None
    ]
    if compiled:
        raise ConversionError(
            f"revify.convert: {', '.join(compiled[:4])}{' ...' if len(compiled) > 4 else ''} "
            f"{'is' if len(compiled) == 1 else 'are'} compiled (torch.compile or "
            "Module.compile), which torch.fx cannot trace, and a compiled unit would draw other "
            "random numbers in its recompute than in its forward; convert the uncompiled model "
            "first and compile afterwards: torch.compile(revify.convert(model))"
        )
    if is_converted(model):
        warnings.warn(
            "revify.convert: model is already converted; returning it unchanged",
            stacklevel=2,
        )
        return model
    if min_units < 1:
        raise ValueError(f"revify.convert: min_units must be >= 1, got {min_units}")
    if plan is not None and memory_budget is not None:
        raise ValueError("revify.convert: give plan= or memory_budget=, not both")
    if memory_budget is not None and example_input is None:
        raise ValueError(
            "revify.convert: memory_budget plans a training step for a batch of example_input's "
            "shape; pass example_input=torch.zeros(batch_size, C, H, W) (or use "
            "revify.plan_memory(model, (C, H, W), batch_size, memory_budget=...))"
        )
    sharded = _fsdp.sharded_modules(model)
    if sharded and not _fsdp.converting():  # NOTE [ Sharded before convert ] in _fsdp.py
        if not _fsdp.is_sharded_root(model):
            raise ConversionError(
                f"revify.convert: {', '.join(sharded[:3])}{' ...' if len(sharded) > 3 else ''} "
                "already sharded by fully_shard (FSDP2), but not the model itself: conversion "
                "runs the model, which must start FSDP's lazy initialisation at the root; "
                "fully_shard(model) as well (torchtitan style), or revify.convert(model) "
                "first, then fully_shard each block and the root (docs/distributed.md)"
            )
        casting = _fsdp.casting_modules(model)
        if casting:
            raise ConversionError(
                f"revify.convert: {', '.join(casting[:3])}{' ...' if len(casting) > 3 else ''} "
                "sharded by fully_shard with a mixed-precision policy (param_dtype / "
                "output_dtype), whose casts conversion cannot run through; call "
                "revify.convert(model) first, then fully_shard each block and the root with "
                "that policy (docs/distributed.md)"
            )
        with _fsdp.unsharded(model):
            return convert(
                model, example_input, alpha=alpha, beta=beta, exact=exact, coupling=coupling,
                checkpoint_stem=checkpoint_stem, checkpoint_transitions=checkpoint_transitions,
                min_units=min_units, strict=strict, plan=plan, memory_budget=memory_budget,
            )
    if _stacks.is_transformers_module(model):  # NOTE [ Layer stacks ] in _stacks.py
        if plan is not None or memory_budget is not None:
            raise ConversionError(
                "revify.convert: plan= and memory_budget= are not supported for Hugging Face "
                "layer stacks yet; convert without them"
            )
        options = dict(**_coupling_options(coupling, alpha, beta, exact), min_units=min_units)
        return _stacks.convert_stacks(model, example_input, options)
    if isinstance(example_input, dict):
        example_input = _by_name(model, example_input)
    if example_input is None:
        example_input = _default_example(model)
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    options = dict(
        **_coupling_options(coupling, alpha, beta, exact),
        checkpoint_stem=checkpoint_stem,
        checkpoint_transitions=checkpoint_transitions,
        min_units=min_units,
    )
    if callable(getattr(model, "set_grad_checkpointing", None)):
        # timm's per-block checkpointing would be traced into the graph (and bypass ours).
        model.set_grad_checkpointing(False)
    try:
        trunk = _build_plan(model, inputs, options)
    except _Untraceable as e:
        if plan is not None or memory_budget is not None:
            raise ConversionError(f"{e}; plan= and memory_budget= need a trunk that converts "
                                  "as one plan") from e
        done = _convert_submodules(model, inputs, options)
        if done:
            warnings.warn(
                f"{e} -- converted traceable submodules instead: {', '.join(done)}",
                stacklevel=2,
            )
            return model
        if strict:
            raise
        warnings.warn(f"{e} -- no submodule could be converted either; the model is "
                      "returned unchanged", stacklevel=2)
        return model
    if not trunk.stages:
        segments = {seg.name for seg in trunk.segments}
        why = "; ".join(f"{r.name}: {r.detail}" for r in trunk.report if r.name not in segments)
        msg = (
            f"revify.convert: no chain of identity residual units found in "
            f"{type(model).__name__}.{trunk.method}; the model is returned unchanged"
            + (f" ({why})" if why else " (it has no residual adds)")
        )
        if strict or plan is not None or memory_budget is not None:
            raise ConversionError(msg)
        warnings.warn(msg, stacklevel=2)
        return model
    _install(model, trunk, record=True)
    _install_containers(model, trunk, inputs, options)
    if plan is not None or memory_budget is not None:
        from . import planner  # NOTE [ Planning ] in planner.py

        try:
            if plan is not None:
                planner.install(model, plan)
            else:
                trunk.memory_plan = planner.plan_converted(model, inputs[0], memory_budget)
        except BaseException:
            revert(model)
            raise
    return model


def _by_name(model: nn.Module, inputs: dict[str, Any]) -> tuple[Any, ...]:
    """Keyword example inputs as the trunk method's required arguments, in order."""
    method = entry_method(model)
    names = required_args(model, method)
    if sorted(inputs) != sorted(names):
        raise ConversionError(
            f"revify.convert: {type(model).__name__}.{method} takes the inputs "
            f"({', '.join(names)}) but example_input gave ({', '.join(inputs)})"
        )
    return tuple(inputs[n] for n in names)


def _child_inputs(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None = None
                  ) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Inputs (args, kwargs) of each direct child called exactly once with tensors (or lists of
    them, or None: NOTE [ Optional inputs ] in _trace.py), recorded by running ``model``
    eagerly in eval mode without grad (no state changes)."""
    seen: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
    handles = []
    for name, child in model.named_children():
        def hook(_m, args, kwargs, name=name):
            seen.setdefault(name, []).append((args, dict(kwargs)))
        handles.append(child.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with training_kept(model), torch.no_grad():
            model.eval()
            model(*inputs, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return {
        name: calls[0]
        for name, calls in seen.items()
        if len(calls) == 1 and calls[0][0] and isinstance(calls[0][0][0], Tensor)
        and all(_tensors_or_none(a) for a in (*calls[0][0], *calls[0][1].values()))
    }


def _tensors_or_none(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, Tensor) for v in value)
    return value is None or isinstance(value, Tensor)


def _convert_submodules(model: nn.Module, inputs: tuple[Any, ...], options: dict[str, Any],
                        kwargs: dict[str, Any] | None = None) -> list[str]:
    """The submodule fallback: convert each child that traces, recursing into those that do
    not. Returns the paths converted."""
    done: list[str] = []
    for name, (args, named) in _child_inputs(model, inputs, kwargs).items():
        child = model.get_submodule(name)
        try:
            plan = _build_plan(child, args, options, named)
        except _Untraceable:
            done += [f"{name}.{p}"
                     for p in _convert_submodules(child, args, options, named)]
            continue
        except (ConversionError, TypeError):
            continue
        if plan.stages:
            _install(child, plan, record=True)
            done.append(name)
    return done
