"""Installing a :class:`~revify._plan.Plan` on a model, and running it.

``_install`` puts a replacement for the trunk method (``_Rewritten``) in the model's
``__dict__``; it runs the plan's segments (checkpointed) and stages (reversible) in order. No
module, parameter or buffer is moved, added or renamed. The rest guards the other ways a
converted model is reached: torch.compile (the plan runs eagerly), torch.fx tracing,
torch.jit.script, timm's ``forward_intermediates`` and ``set_grad_checkpointing``, modules
swapped after conversion, and direct calls of a module holding a whole stage, which plans
itself on its first call (``_LazyContainer``).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import _direct, _mode, _record
from ._plan import _PLAN, ConversionError, Plan, _build_plan, _Ref, programs_known
from ._replay import _EPOCH, HOOK_DICTS, foreign_hooks, own_hook, slots_of
from ._trace import Constant, _short, flatten_input
from .coupling import ReversibleStage, _GraphUnit

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
            "replays the forward's random numbers (NOTE [ torch.compile ] in revify/_install.py)",
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
            form = plan.arg_forms.get(name)
            default = form.value if isinstance(form, Constant) else params[name].default
            if value is not default and not _same(value, default):
                raise TypeError(
                    f"revify: the converted {type(model).__name__}.{plan.method} was traced with "
                    f"{name}={default!r} and cannot take {name}={value!r}; call "
                    "revify.revert(model) first, or convert with that value"
                )
        if plan.checked_epoch != _EPOCH[0]:
            _check_structure(model, plan)
        if not torch.compiler.is_compiling():  # dynamo: the trunk is one eager call
            _refuse_holder_hooks(model, plan)
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


# NOTE [ Intermediates ]
# timm's forward_intermediates of ResNet, ConvNeXt and Swin calls stage modules, which run the
# converted stages. ViT's (and DeiT's, EVA's, BEiT's, ...) calls its blocks one by one and
# keeps some of their outputs: run so, the blocks would run unconverted (no memory saved, and
# the original function, not the converted forward's coupling). So at its first call with a
# given set of non-tensor arguments (indices, norm, output_fmt, ...) the method is planned as a
# trunk of its own, those arguments as constants of the trace and the kept block outputs as
# taps of the stage (NOTE [ Taps ] in coupling.py). Its stages must be the trunk's (then they
# are the trunk's objects), or a leading part of one (stop_early: a stage of its own that
# follows the trunk stage's coefficients and treatment at every call); otherwise, or where the
# method cannot be planned, it runs as written and warns once if it called units one by one.


class _Intermediates:
    """``forward_intermediates`` of a converted timm model: planned per set of non-tensor
    arguments, or the original method, watched (NOTE [ Intermediates ])."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.warned = False
        # per argument key: (the planned method, stages following trunk stages), or why not
        self.plans: dict[Any, tuple[_Rewritten, list[tuple[Any, Any]]] | str] = {}

    def __getstate__(self) -> dict[str, Any]:  # plans are rebuilt after a copy or a load
        return {**self.__dict__, "plans": {}}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        plan = model.__dict__.get(_PLAN)
        method = type(model).forward_intermediates
        if plan is None or _mode.is_original():
            return method(model, *args, **kwargs)
        why = "it is traced or compiled"
        if _fx_tracer(args, kwargs) is None and not torch.compiler.is_compiling():
            key = _argument_key(method, model, args, kwargs)
            if key is None:
                why = "its arguments cannot be told apart between calls"
            else:
                if key not in self.plans:
                    self.plans[key] = self._plan(plan, args, kwargs)
                got = self.plans[key]
                if not isinstance(got, str):
                    run, follow = got
                    for own, trunk in follow:
                        _follow(own, trunk)
                    return run(*args, **kwargs)
                why = got
        if self.warned:
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
                "the original network's function, not the converted forward's coupling), "
                f"since {why or 'it was planned into no stage'} (NOTE [ Intermediates ] in "
                "revify/_install.py). Use forward_features for memory savings (README, "
                "Limitations)",
                stacklevel=2,
            )
        return out

    def _plan(self, trunk: Plan, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[_Rewritten, list[tuple[Any, Any]]] | str:
        model = self.model
        try:
            # traced as the unconverted code: modules holding stages (layer1, Swin's blocks)
            # traced through, not recorded as calls (NOTE [ Tracing a converted model ])
            with _mode._original(), programs_known(trunk):
                sub = _plan_call(model, args, kwargs, trunk.options,
                                 method="forward_intermediates", constants=True)
        except Exception as e:  # noqa: BLE001 - any failure: run the method as written
            text = str(e).split("\n")[0]
            return f"it could not be planned ({type(e).__name__}: {text[:200]})"
        if not sub.stages:
            return ""
        trunk_stages = {tuple(u.name for u in st.units): st for st in trunk.stages}
        follow = []
        for i, st in enumerate(sub.stages):
            names = tuple(u.name for u in st.units)
            same = trunk_stages.get(names)
            if same is not None:
                for step in sub.steps:
                    if step.run is st:
                        step.run = same
                sub.stages[i] = same
                continue
            lead = next((t for n, t in trunk_stages.items() if n[:len(names)] == names), None)
            if lead is None:
                return (f"its units {', '.join(names[:2])}{' ...' if len(names) > 2 else ''} "
                        "form no stage of the converted forward")
            follow.append((st, lead))
        _ready(model, sub)
        return _Rewritten(model, sub), follow


def _argument_key(method: Any, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> Any:
    """What tells two calls' plans apart: each given argument's value, or its form where it is
    tensors; None when a value cannot be compared (NOTE [ Intermediates ])."""
    try:
        bound = inspect.signature(method).bind(model, *args, **kwargs)
    except TypeError:
        return None

    def frozen(v: Any) -> Any:
        if isinstance(v, Tensor):
            return ("tensor",)
        if type(v) in (list, tuple):
            return (type(v).__name__, *map(frozen, v))
        if isinstance(v, dict):
            return ("dict", *((k, frozen(x)) for k, x in sorted(v.items(), key=repr)))
        return v

    key = tuple((name, frozen(v)) for name, v in list(bound.arguments.items())[1:])
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _follow(own: Any, trunk: Any) -> None:
    """Give stage ``own`` (a leading part of ``trunk``'s units) ``trunk``'s settings."""
    own.exact = trunk.exact
    own.alpha, own.beta = trunk.alpha, trunk.beta
    treatment = trunk.treatment
    if treatment.startswith("checkpoint:"):
        treatment = f"checkpoint:{min(int(treatment.split(':')[1]), len(own.units))}"
    if own.treatment != treatment:
        own.treatment = treatment
    own.on_mismatch, own.mismatch_tolerance = trunk.on_mismatch, trunk.mismatch_tolerance
    own.record_input = trunk.record_input


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


# NOTE [ Hooks on stage holders ]
# The converted trunk runs each stage itself: the module holding it (timm's layer1, a
# Sequential of blocks), and the modules above it inside the trunk, are traced through and not
# called, so their module hooks would silently not run (a forward hook on layer2 collecting
# features, or changing the output, did nothing). Their hooks are looked up at every call
# (a few attribute reads) and refused, naming the module. Forward hooks on units and on the
# layers inside them run, their stage as ordinary autograd (NOTE [ Forward hooks inside stages ]
# in _replay.py); FSDP2's own are revify's.


def _refuse_holder_hooks(model: nn.Module, plan: Plan) -> None:
    holders = plan.__dict__.get("_holder_modules")
    if holders is None or holders[0] != _EPOCH[0]:
        paths = {".".join(h.split(".")[:i]) for h in plan.holders if h
                 for i in range(1, h.count(".") + 2)}
        found = []
        for path in sorted(paths):
            try:
                found.append((path, model.get_submodule(path)))
            except AttributeError:
                continue
        holders = (_EPOCH[0], found)
        plan.__dict__["_holder_modules"] = holders
    for path, module in holders[1]:
        if any(map(foreign_hooks, HOOK_DICTS(module))):
            raise RuntimeError(
                f"revify: {path} ({type(module).__name__}) has module hooks, which would not run: "
                f"the converted {type(model).__name__}.{plan.method} runs the stage it holds "
                "without calling it (NOTE [ Hooks on stage holders ] in revify/_install.py); "
                "register them on its blocks or on the model, or call revify.revert(model) first"
            )


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
                "convert ] in revify/_install.py)"
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
    args, kwargs = _fixed_arguments(model, plan, tracer, args, kwargs)
    # The original code may still reach the units another way (a branch on another Proxy
    # argument): a unit's module called while tracing raises.
    guarded = {id(m): (m, _TracedThrough(st.name, type(m).__name__))
               for st in plan.stages for unit in st.units for m in unit.modules}
    with _forwards_replaced(guarded.values()):
        return getattr(type(model), plan.method)(model, *args, **kwargs)


# NOTE [ Fixed arguments under fx ]
# symbolic_trace makes every argument of the traced forward a Proxy, defaults included, and
# timm's forward hands its own to the trunk (ViT: forward_features(x, attn_mask=attn_mask)).
# The converted trunk fixed such an argument at the value it was traced with (its default: the
# eager call raises for any other), but a Proxy ``attn_mask`` takes the original code's
# ``if attn_mask is not None`` branch, which calls the blocks one by one. So each Proxy given
# for a fixed argument whose value is a plain constant is replaced by that value while the
# trunk is traced, and the graph records a check in its place: the GraphModule raises, as the
# eager converted trunk does, when called with another value, instead of ignoring it.
_CONSTANTS = (type(None), bool, int, float, str)


def _is_fixed(value: Any, fixed: Any) -> bool:
    """Whether ``value`` is the value a converted trunk was traced with (a plain constant)."""
    return value is fixed or (type(value) is type(fixed) and value == fixed)


def _fixed_arguments(model: nn.Module, plan: Plan, tracer: fx.Tracer, args: Sequence[Any],
                     kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with each Proxy for a fixed argument replaced by its value, a
    check recorded in the graph for each (NOTE [ Fixed arguments under fx ])."""
    original = getattr(type(model), plan.method)
    signature = inspect.signature(original)
    try:
        bound = signature.bind(model, *args, **kwargs)
    except TypeError:
        return tuple(args), dict(kwargs)
    changed = False
    for name, value in list(bound.arguments.items())[1:]:
        param = signature.parameters[name]
        if (name in plan.args or not isinstance(value, fx.Proxy)
                or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD)):
            continue
        form = plan.arg_forms.get(name)
        fixed = form.value if isinstance(form, Constant) else param.default
        if not isinstance(fixed, _CONSTANTS):
            continue
        ok = tracer.create_proxy("call_function", _is_fixed, (value, fixed), {})
        tracer.create_proxy("call_function", torch._assert, (ok, (
            f"revify: the converted {type(model).__name__}.{plan.method} was traced with "
            f"{name}={fixed!r} and cannot take another value; call revify.revert(model) first, "
            "or convert with that value")), {})
        bound.arguments[name] = fixed
        changed = True
    if not changed:
        return tuple(args), dict(kwargs)
    return bound.args[1:], bound.kwargs


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


@own_hook
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


# NOTE [ torch.func ]
# revify's autograd Functions (a unit's step, a checkpointed segment) define forward and
# backward only, so torch.func's transforms (grad, vmap, jvp, jacrev: per-sample gradients,
# Jacobians) refused them with torch's "must override the setup_context staticmethod", which
# names no revify object. Under such a transform the plan runs as ordinary autograd, as under
# revify.plain_autograd() (the same function; measured on a float64 ResNet: grad, vmap of
# grad and jvp agree with the unconverted model's to 2e-15), warned once: activations are
# stored there.


def _run_plan(plan: Plan, args: Sequence[Any]) -> Any:
    if torch._C._are_functorch_transforms_active() and not _mode.is_plain():
        warnings.warn(
            "revify: under a torch.func transform (grad, vmap, jvp, ...) converted stages and "
            "segments run as ordinary autograd, storing their activations (NOTE [ torch.func ] "
            "in revify/_install.py)", stacklevel=4,
        )
        with _mode.plain_autograd():
            return _run_plan(plan, args)
    env: dict[str, Any] = dict(zip(plan.placeholders, args, strict=True))
    for step in plan.steps:
        token = _mode.current_step.set(step.run.name)
        try:
            if step.taps:  # a stage handing out states as well (NOTE [ Taps ] in coupling.py)
                outs = step.run(*(env[n] for n in step.inputs), taps=step.taps)
            else:
                outs = step.run(*(env[n] for n in step.inputs))
                if isinstance(step.run, ReversibleStage):
                    outs = (outs,)
        finally:
            _mode.current_step.reset(token)
        observer = _mode.step_observer.get()
        if observer is not None:  # the planner's cost measurement (_costs.py)
            observer(step.run, outs)
        env.update(zip(step.outputs, outs, strict=True))
        for name in step.release:
            env.pop(name, None)
    return fx.node.map_aggregate(plan.output, lambda n: env[n] if isinstance(n, _Ref) else n)


def _install(model: nn.Module, plan: Plan, record: bool = False, container: bool = False
             ) -> None:
    """Make ``model`` run ``plan``; ``record``: its state dict records the coupling (a module
    ``convert`` was called on; NOTE [ Checkpoint record ] in _record.py); ``container``: a
    module holding a stage of its parent's plan (NOTE [ Tracing a converted model ])."""
    if record:
        _record.install(model)
        if plan.method == "forward":
            _guard_units(plan, install=True)
        if callable(getattr(type(model), "forward_intermediates", None)):
            model.__dict__["forward_intermediates"] = _Intermediates(model)
    model.__dict__["__prepare_scriptable__"] = _NotScriptable(model)
    model.__dict__[_PLAN] = plan
    model.__dict__[plan.method] = _Rewritten(model, plan, container)
    if callable(getattr(model, "set_grad_checkpointing", None)):
        model.__dict__["set_grad_checkpointing"] = _GradCheckpointingIgnored()
    _ready(model, plan)


def _ready(model: nn.Module, plan: Plan) -> None:
    """Find ``plan``'s unit modules (its anchors) on ``model``, and make the first step find
    every unit's and segment's slots ready (NOTE [ Slot cache ]) and the modules their code
    calls directly (NOTE [ Direct calls ] in _direct.py)."""
    plan.anchors = _anchors(model, plan)
    for holder in [*(u for st in plan.stages for u in st.units), *plan.segments]:
        slots_of(holder)
        _direct.prime(holder)
    # the anchors are where they were just found (NOTE [ Structure changed after convert ])
    plan.checked_epoch = _EPOCH[0]


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
        # unit, which the stage calls; nor the module whose own forward holds an inline unit.
        if not holder or any(isinstance(u, _GraphUnit) and u.name.split(":")[0] == holder
                             for u in st.units):
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
        sub = _plan_call(container, args, kwargs, self.options)
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


def _plan_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               options: dict[str, Any], **build: Any) -> Plan:
    """:func:`_build_plan` for ``module`` called with ``args``/``kwargs`` from inside a forward:
    on copies of the inputs (under torch.inference_mode they are inference tensors, which
    planning's shape propagation cannot use), without grad or autocast, and not seen as a unit
    called from outside its stage."""
    token = _mode.current_step.set("revify: planning")
    try:
        with torch.inference_mode(False), torch.no_grad(), _no_autocast():
            return _build_plan(module, _copies(args), options,
                               {k: _copies(v) for k, v in kwargs.items()}, **build)
    finally:
        _mode.current_step.reset(token)


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
