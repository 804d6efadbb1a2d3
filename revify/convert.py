"""``revify.convert``: the public entry points of the pass that turns residual chains into
reversible stages, and installing a plan on a model.

Planning (tracing the trunk, finding the residual units, grouping them into stages and
segments) is in ``_plan.py``. What is left here installs a replacement for the trunk method
that runs segments (checkpointed) and stages (reversible) in order. No module, parameter or
buffer is moved, added or renamed.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import _fsdp, _mode, _record, _stacks
from ._plan import _PLAN, ConversionError, Plan, _build_plan, _Ref, _Untraceable
from ._replay import _EPOCH, slots_of
from ._trace import _short, entry_method, flatten_input, required_args
from .coupling import ReversibleStage, _GraphUnit

__all__ = [
    "convert", "revert", "load_state_dict", "stages", "set_on_mismatch", "ConversionError",
    "COUPLINGS",
]

# NOTE [ torch.compile ]
# A converted trunk runs eagerly even inside torch.compile: dynamo would trace the stages'
# and segments' forwards into a graph whose random numbers (dropout, DropPath) come from
# inductor's generator, while their recompute in backward runs eagerly from torch's, so the
# masks differed (finite-difference error 1.8). The trunk's plan is therefore called through
# torch.compiler.disable: dynamo breaks the graph there and compiles what comes before and
# after (timm's forward_head), and under fullgraph=True it says so.
_run_plan_eagerly: Any = None


def _ensure_eager_plan() -> None:
    """Make :data:`_run_plan_eagerly` (imports torch._dynamo once, as timm already does)."""
    global _run_plan_eagerly
    if _run_plan_eagerly is None:
        _run_plan_eagerly = torch.compiler.disable(
            _run_plan,
            reason="revify: a converted trunk runs eagerly, so that its recompute in backward "
            "replays the forward's random numbers (NOTE [ torch.compile ] in revify/convert.py)",
        )


class _Rewritten:
    """Replacement for the trunk method, installed on the instance (``model.forward_features``)."""

    container = False

    def __init__(self, model: nn.Module, plan: Plan, container: bool = False) -> None:
        self.model = model
        self.plan = plan
        self.container = container  # a module holding a stage of its parent's plan
        _ensure_eager_plan()

    def __setstate__(self, state: dict[str, Any]) -> None:  # torch.load, copy.deepcopy
        self.__dict__.update(state)
        _ensure_eager_plan()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model, plan = self.model, self.plan
        original = getattr(type(model), plan.method)
        if _mode.is_original():
            return original(model, *args, **kwargs)
        tracer = _fx_tracer(args, kwargs)
        if tracer is not None:
            return _traced(model, plan, tracer, args, kwargs, leaf=self.container)
        bound = inspect.signature(original).bind(model, *args, **kwargs)
        bound.apply_defaults()
        values = dict(list(bound.arguments.items())[1:])
        params = inspect.signature(original).parameters
        inputs: list[Any] = []
        for name, value in values.items():
            if name in plan.args:
                form = plan.arg_forms.get(name)
                flat = [value] if form is None else flatten_input(form, value)
                if flat is None:  # NOTE [ Optional inputs ] in _trace.py
                    given = form if isinstance(form, str) else "{} of {} tensors".format(*form)
                    raise TypeError(
                        f"revify: the converted {type(model).__name__}.{plan.method} was traced "
                        f"with {name} given as {given} and cannot take {name}={_short(value)}; "
                        "call revify.revert(model) first, or convert with that form"
                    )
                inputs += flat
                continue
            default = params[name].default
            if value is not default and not _same(value, default):
                raise TypeError(
                    f"revify: the converted {type(model).__name__}.{plan.method} was traced with "
                    f"{name}={default!r} and cannot take {name}={value!r}; call "
                    "revify.revert(model) first, or convert with that value"
                )
        if plan.checked_epoch != _EPOCH[0]:
            _check_structure(model, plan)
        run = _run_plan if _run_plan_eagerly is None else _run_plan_eagerly
        return run(plan, inputs)


# NOTE [ Structure changed after convert ]
# A stage calls its units' modules through references taken at conversion. Code that swaps
# modules afterwards (timm's prune_intermediate_layers slicing `blocks`, set_input_size, a user
# replacing a block) would leave the stage running the old modules: a pruned ViT ran all its
# blocks and sent gradients to removed ones. Every module registration moves the slot cache's
# epoch (NOTE [ Slot cache ] in _replay.py); at the first call after a move, each unit module
# must still sit at its path, or the call raises. Submodules *inside* a unit (LoRA replacing a
# conv of a block) are followed, as the slot cache re-reads them.


class _Intermediates:
    """``forward_intermediates`` of a converted timm model: the original method, watched.

    ResNet's and ConvNeXt's call their stage modules, which run the converted stages; ViT's and
    Swin's call the blocks one by one, which then run unconverted: no memory saved, and the
    original network's function rather than the coupling's. That warns, once per model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.warned = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        plan = model.__dict__.get(_PLAN)
        method = type(model).forward_intermediates
        if plan is None or self.warned or _mode.is_original():
            return method(model, *args, **kwargs)
        outside: list[str] = []
        watched = {id(m): (m, _Watched(m, m.__dict__.get("forward"), path, outside))
                   for path, m in plan.anchors}
        with _forwards_replaced(watched.values()):
            out = method(model, *args, **kwargs)
        if outside:
            self.warned = True
            warnings.warn(
                f"revify: {type(model).__name__}.forward_intermediates called the units "
                f"{', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''} one by one, "
                "outside their reversible stage: they ran unconverted (activations stored, and "
                "the original network's function, not the converted forward's coupling). "
                "Use forward_features for memory savings (README, Limitations)",
                stacklevel=2,
            )
        return out


class _Watched:
    """``forward`` of a unit module during ``forward_intermediates``: notes calls from outside
    any plan step, then runs the module as it would have run."""

    def __init__(self, module: nn.Module, before: Any, path: str, outside: list[str]) -> None:
        self.module, self.before, self.path, self.outside = module, before, path, outside

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _mode.current_step.get() is None:
            self.outside.append(self.path)
        if self.before is not None:
            return self.before(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


def _anchors(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Module]]:
    """(path, module) of the unit modules ``plan``'s stages hold references to."""
    paths = {id(m): p for p, m in model.named_modules()}
    out = []
    for st in plan.stages:
        for unit in st.units:
            module = getattr(unit, "module", None)
            if isinstance(module, nn.Module) and id(module) in paths:
                out.append((paths[id(module)], module))
    return out


def _check_structure(model: nn.Module, plan: Plan) -> None:
    for path, module in plan.anchors:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            found = None
        if found is not module:
            raise ConversionError(
                f"revify: {type(model).__name__}.{path} is no longer the module converted into "
                f"a reversible stage ({'removed' if found is None else 'replaced'} after "
                "convert: prune_intermediate_layers, set_input_size, or a module assigned); the "
                "stage would still run the old one. Call revify.revert(model) and convert "
                "again, or make such changes before converting (NOTE [ Structure changed after "
                "convert ] in revify/convert.py)"
            )
    plan.checked_epoch = _EPOCH[0]


# NOTE [ Tracing a converted model ]
# torch.fx tracing a converted model (timm's and torchvision's fx feature extraction,
# quantisation passes) calls the rewritten trunk with Proxies. Its stages are autograd
# Functions and cannot take Proxies; tracing through the original code instead would record
# the unconverted function. So the trunk is traced through its original code with every module
# that holds a whole stage (``layer1``, ``stages.0.blocks``) recorded as one ``call_module``
# node: the GraphModule then calls that module, which runs the converted stage. The layers
# between stages are traced as plain layers (the same function, not checkpointed). A stage
# that no module holds alone (inline units, or units called one by one from the trunk) cannot
# be recorded so, and tracing is refused rather than recording the original function.


def _fx_tracer(args: Sequence[Any], kwargs: dict[str, Any]) -> fx.Tracer | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, fx.Proxy):
            return a.tracer
    return None


def _traced(model: nn.Module, plan: Plan, tracer: fx.Tracer, args: Sequence[Any],
            kwargs: dict[str, Any], leaf: bool) -> Any:
    """What ``plan``'s method records under torch.fx (NOTE [ Tracing a converted model ])."""
    if leaf:
        try:
            path = tracer.path_of_module(model)
        except NameError:
            path = None
        if path is not None:
            return tracer.create_proxy("call_module", path, tuple(args), dict(kwargs))
    for st, holder in zip(plan.stages, plan.holders, strict=True):
        container = model.get_submodule(holder) if holder else None
        held = container is not None and container is not model and isinstance(
            container.__dict__.get("forward"), (_LazyContainer, _Rewritten))
        if not held:
            raise ConversionError(
                f"revify: torch.fx cannot trace the converted {type(model).__name__}."
                f"{plan.method}: its stage {st.name} is not held by a module of its own (inline "
                "residuals, or units called one by one), so it cannot be recorded as one call, "
                "and tracing through it would record the unconverted function; trace the "
                "model before revify.convert, or under revify.revert"
            )
    # The original code may still reach the units another way (ViT's forward_features loops
    # over its blocks when attn_mask is a Proxy): a unit's module called while tracing raises.
    guarded = {id(m): (m, _TracedThrough(st.name, type(m).__name__))
               for st in plan.stages for unit in st.units for m in unit.modules}
    with _forwards_replaced(guarded.values()):
        return getattr(type(model), plan.method)(model, *args, **kwargs)


@contextlib.contextmanager
def _forwards_replaced(replacements: Iterable[tuple[nn.Module, Any]]) -> Iterator[None]:
    """Within the block, each module's instance ``forward`` is its replacement; restored
    after (an instance forward revify installed, or none)."""
    replacements = list(replacements)
    before = [(m, m.__dict__.get("forward")) for m, _ in replacements]
    for m, new in replacements:
        m.__dict__["forward"] = new
    try:
        yield
    finally:
        for m, old in before:
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = old


def _refuse_fx_trace(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook on the units' modules of a plan installed as ``forward``: torch.fx
    traces a root's ``type(root).forward``, not the instance's, so tracing such a model walks
    the original code (NOTE [ Tracing a converted model ]); refuse when it reaches a unit."""
    fxt = fx._symbolic_trace
    tracing = getattr(fxt, "is_fx_symbolic_tracing", fxt.is_fx_tracing)
    if tracing():
        proxy = next((a for a in args if isinstance(a, fx.Proxy)), None)
        if proxy is not None and not isinstance(proxy.tracer, _own_tracers()):
            raise ConversionError(
                f"revify: torch.fx traced into {type(module).__name__}, a unit of a converted "
                "model whose forward is the converted one; fx traces the class's forward, which "
                "would record the unconverted function; trace the model before revify.convert, "
                "or under revify.revert"
            )


def _own_tracers() -> tuple[type, ...]:
    from ._trace import _Tracer

    return (_Tracer,)


def _guard_units(plan: Plan, install: bool) -> None:
    """(Un)register :func:`_refuse_fx_trace` on the units' modules of ``plan``."""
    for st in plan.stages:
        for unit in st.units:
            for m in unit.modules:
                for key, hook in list(m._forward_pre_hooks.items()):
                    if hook is _refuse_fx_trace:
                        del m._forward_pre_hooks[key]
                if install:
                    m.register_forward_pre_hook(_refuse_fx_trace)


class _TracedThrough:
    """``forward`` of a unit's module while its converted parent is traced: refuses."""

    def __init__(self, stage: str, kind: str) -> None:
        self.stage, self.kind = stage, kind

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ConversionError(
            f"revify: torch.fx traced into a {self.kind} of the converted stage {self.stage} "
            "without calling the module that holds the stage (another code path, e.g. a Proxy "
            "argument taking an `if x is not None` branch), which would record the unconverted "
            "function; pass concrete_args for such arguments (e.g. attn_mask=None), or trace "
            "the model before revify.convert"
        )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _run_plan(plan: Plan, args: Sequence[Any]) -> Any:
    env: dict[str, Any] = dict(zip(plan.placeholders, args, strict=True))
    for step in plan.steps:
        token = _mode.current_step.set(step.run.name)
        try:
            outs = step.run(*(env[n] for n in step.inputs))
        finally:
            _mode.current_step.reset(token)
        if isinstance(step.run, ReversibleStage):
            outs = (outs,)
        observer = _mode.step_observer.get()
        if observer is not None:  # the planner's cost measurement (_costs.py)
            observer(step.run, outs)
        env.update(zip(step.outputs, outs, strict=True))
        for name in step.release:
            env.pop(name, None)
    return fx.node.map_aggregate(plan.output, lambda n: env[n] if isinstance(n, _Ref) else n)


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
    ``pretrained_cfg['input_size']`` still says 224), else timm's ``pretrained_cfg``, else
    224x224; the channels are the first convolution's input channels (``in_chans=1``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    channels, *spatial = size if size is not None else (3, 224, 224)
    configured = getattr(getattr(model, "patch_embed", None), "img_size", None)
    configured = configured if configured is not None else getattr(model, "img_size", None)
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
    if _is_compiled_wrapper(model):
        # torch.compile(model): convert the module it wraps; the wrapper then compiles the
        # converted model (its trunk runs eagerly, NOTE [ torch.compile ]).
        convert(model._orig_mod, example_input, coupling=coupling, alpha=alpha, beta=beta,
                exact=exact, checkpoint_stem=checkpoint_stem,
                checkpoint_transitions=checkpoint_transitions, min_units=min_units,
                strict=strict, plan=plan, memory_budget=memory_budget)
        return model
    compiled = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if _is_compiled_wrapper(m) or m._compiled_call_impl is not None
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
    if sharded:
        raise ConversionError(
            f"revify.convert: {', '.join(sharded[:3])}{' ...' if len(sharded) > 3 else ''} "
            "already sharded by fully_shard (FSDP2): conversion traces and runs the model, "
            "which starts FSDP's lazy initialisation from a submodule; call "
            "revify.convert(model) first, then fully_shard each block and the root "
            "(docs/distributed.md)"
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


def _is_compiled_wrapper(module: nn.Module) -> bool:
    """``torch.compile(module)``'s ``OptimizedModule`` (without importing torch._dynamo)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(
        module.__dict__.get("_modules", {}).get("_orig_mod"), nn.Module
    )


def _install(model: nn.Module, plan: Plan, record: bool = False, container: bool = False
             ) -> None:
    """Make ``model`` run ``plan``; ``record``: its state dict records the coupling (a module
    ``convert`` was called on; NOTE [ Checkpoint record ]); ``container``: a module holding a
    stage of its parent's plan (NOTE [ Tracing a converted model ])."""
    if record:
        _record.install(model)
        if plan.method == "forward":
            _guard_units(plan, install=True)
        if callable(getattr(type(model), "forward_intermediates", None)):
            model.__dict__["forward_intermediates"] = _Intermediates(model)
    plan.anchors = _anchors(model, plan)
    model.__dict__["__prepare_scriptable__"] = _NotScriptable(model)
    model.__dict__[_PLAN] = plan
    model.__dict__[plan.method] = _Rewritten(model, plan, container)
    if callable(getattr(model, "set_grad_checkpointing", None)):
        model.__dict__["set_grad_checkpointing"] = _GradCheckpointingIgnored()
    # The first step finds every unit's and segment's slots ready (NOTE [ Slot cache ]).
    for holder in [*(u for st in plan.stages for u in st.units), *plan.segments]:
        slots_of(holder)


class _NotScriptable:
    """``__prepare_scriptable__`` of a converted module: ``torch.jit.script`` calls it first and
    would otherwise fail on revify's instance-level forwards with an unrelated error."""

    def __init__(self, module: nn.Module) -> None:
        self.name = type(module).__name__

    def __call__(self) -> nn.Module:
        raise TypeError(
            f"revify: a converted {self.name} cannot be scripted with torch.jit.script (its "
            "stages are Python autograd Functions); script the model before revify.convert, "
            "or after revify.revert(model)"
        )


class _GradCheckpointingIgnored:
    """Stands in for timm's ``set_grad_checkpointing`` on a converted model: revify already
    recomputes activations, and wrapping its stages in ``torch.utils.checkpoint`` would run
    every layer a third time and update BatchNorm statistics twice."""

    def __call__(self, enable: bool = True) -> None:
        if enable:
            warnings.warn(
                "revify: set_grad_checkpointing(True) is ignored on a converted model (its "
                "stages are reversible and its transitions already checkpointed); call "
                "revify.revert(model) first to use timm's checkpointing",
                stacklevel=2,
            )


def _install_containers(
    model: nn.Module, plan: Plan, inputs: tuple[Any, ...], options: dict[str, Any]
) -> None:
    """Make the modules that hold a whole stage (``layer1``, ``stages.0.blocks``) run it too, so
    that code calling them directly (timm's ``forward_intermediates``, ``model.layer1(x)``)
    computes the same converted function as the trunk. Their plans are built on first call."""
    for st, holder in zip(plan.stages, plan.holders, strict=True):
        # Never a unit's own module (a one-unit chain is named after it): its forward is the
        # unit, which the stage calls.
        if not holder or any(isinstance(u, _GraphUnit) for u in st.units):
            continue
        try:
            container = model.get_submodule(holder)
        except AttributeError:
            continue
        if container is not model and _PLAN not in container.__dict__:
            container.__dict__["forward"] = _LazyContainer(
                container, st, options, holder, plan.stages)
            container.__dict__["__prepare_scriptable__"] = _NotScriptable(container)


class _LazyContainer:
    """``forward`` of a module holding a stage until its first call builds its plan.

    The plan shares the trunk's :class:`ReversibleStage` objects (so ``alpha``/``beta``
    changes reach both): its own stage, and any other stage of the trunk's found inside it (a
    DLA tree holding an inline unit before its own stage). If the module cannot be planned
    into exactly such stages, calling it raises: it would otherwise silently compute the
    unconverted function.
    """

    def __init__(self, container: nn.Module, stage: ReversibleStage, options: dict[str, Any],
                 path: str = "", stages: Sequence[ReversibleStage] = ()) -> None:
        self.container = container
        self.stage = stage
        self.options = options
        self.path = path  # the container's path in the trunk's module
        self.stages = list(stages) or [stage]  # the trunk's stages

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        container = self.container
        if _mode.is_original():
            return type(container).forward(container, *args, **kwargs)
        tracer = _fx_tracer(args, kwargs)
        if tracer is not None:  # NOTE [ Tracing a converted model ]
            return tracer.create_proxy(
                "call_module", tracer.path_of_module(container), tuple(args), dict(kwargs))
        token = _mode.current_step.set("revify: planning")  # not a unit call from outside
        try:
            # Under torch.inference_mode the inputs are inference tensors, which planning's
            # shape propagation cannot use: plan on ordinary copies of them.
            with torch.inference_mode(False), torch.no_grad(), _no_autocast():
                sub = _build_plan(container, _copies(args), self.options,
                                  {k: _copies(v) for k, v in kwargs.items()})
        finally:
            _mode.current_step.reset(token)
        shared = self._shared(sub)
        if shared is None:
            raise ConversionError(
                f"revify: {type(container).__name__} holding stage {self.stage.name} was "
                "called directly but cannot be converted on its own; call the model's trunk "
                "instead, or revify.revert(model) first"
            )
        sub.stages = [shared[id(st)] for st in sub.stages]
        for step in sub.steps:
            if isinstance(step.run, ReversibleStage):
                step.run = shared[id(step.run)]
        _install(container, sub, container=True)
        return container.__dict__[sub.method](*args, **kwargs)

    def _shared(self, sub: Plan) -> dict[int, ReversibleStage] | None:
        """The trunk's stage for each stage of ``sub`` (the same units, by name), if each has
        one and this container's own stage is among them; else None."""
        prefix = f"{self.path}." if self.path else ""
        trunk = {tuple(u.name for u in st.units): st for st in self.stages}
        out: dict[int, ReversibleStage] = {}
        for st in sub.stages:
            match = trunk.get(tuple(prefix + u.name for u in st.units))
            if match is None:
                return None
            out[id(st)] = match
        return out if any(st is self.stage for st in out.values()) else None


def _copies(value: Any) -> Any:
    """``value`` with each tensor (also in a list or tuple) replaced by a detached copy."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if type(value) in (list, tuple):
        return type(value)(map(_copies, value))
    return value


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.amp.is_autocast_available(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


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
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
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
