"""Planning: the half of the pass that turns a model's traced trunk into a :class:`Plan`.

1. Trace the model's trunk method (timm's ``forward_features``, else ``forward``) with torch.fx
   and propagate shapes on fake tensors.
2. Find identity residual units at the node level (``_match.py``). A module whose forward is
   exactly a run of such units (a ResNet ``Bottleneck``, a ViT ``Block``) becomes a *module
   unit*, run eagerly as ``U(h) - h``; other units (``x = x + self.f(x)`` written inline) run as
   generated code for their branch.
3. Trace again with those modules (and every module holding no residual) as leaves, group
   consecutive units into chains, and split the rest of the graph into *segments*: the stem
   before the first chain, the transitions between chains, the tail after the last one.
   In-place writes seen on the fake run decide which units get a copy of their input and
   where a segment must clone a value before writing it (``_inplace.py``).

The plan lists those stages and segments as steps in execution order, with the report of what
was decided for every residual; ``_install.py`` then makes the model run it.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves

from ._direct import UnitProgram
from ._inplace import (
    InplaceError,
    chains_before,
    check_units,
    clone_foreign_writes,
    storage,
    written_from,
    written_values,
)
from ._match import Residual, Unit, chains, find_residuals, is_add
from ._replay import _slots, forward_hooked, read_slots
from ._trace import (
    GraphCode,
    bind_inputs,
    buffers_kept,
    entry_method,
    extract,
    method_entry,
    module_calls,
    module_path,
    propagate_shapes,
    required_args,
    tensor_shape,
    trace_method,
    training_kept,
)
from .checkpoint import Segment
from .coupling import ReversibleStage, _Attr, _BranchUnit, _GraphUnit, _ModuleUnit, _Reads

_PLAN = "_revify_plan"


class ConversionError(RuntimeError):
    """The model cannot be converted (untraceable, nothing to convert with ``strict=True``...)."""


class _Untraceable(ConversionError):
    """The module's trunk cannot be traced (or tracing would freeze a train/eval branch)."""


@dataclass(frozen=True)
class ReportLine:
    """What the pass decided for one residual add or one segment."""

    name: str  # module path
    kind: str  # "reversible", "checkpointed", "unchanged"
    detail: str


@dataclass(frozen=True)
class Block:
    """A top-level block of the trunk as the plan runs it (one row of the audit)."""

    name: str  # module path, or ``Owner:residualN`` for an inline unit
    step: str  # name of the stage or segment that runs it
    treatment: str  # "reversible", "checkpointed" or "unchanged"
    pattern: str = ""  # the residual pattern matched (units) or the segment's role


@dataclass(eq=False)
class _Step:
    run: Any  # Segment or ReversibleStage
    inputs: list[str]
    outputs: list[str]
    release: list[str] = field(default_factory=list)
    taps: list[int] = field(default_factory=list)  # a stage's states read outside it


@dataclass(eq=False)
class Plan:
    """How a converted model's trunk method runs; stored on the model as ``_revify_plan``."""

    method: str
    args: list[str]
    steps: list[_Step]
    output: Any  # structure of node names, as the traced output node's argument
    stages: list[ReversibleStage]
    segments: list[Segment]
    report: list[ReportLine]
    options: dict[str, Any]
    blocks: list[Block] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)  # graph names of ``args``
    # Per stage, the module holding its whole chain as the units' parent ("" if none): only
    # such a module runs the stage when called directly (``_install_containers``, _install.py).
    holders: list[str] = field(default_factory=list)
    # (path, module) of every unit module the stages call directly, and the registration epoch
    # at which they were last found there (NOTE [ Structure changed after convert ] in
    # _install.py).
    anchors: list[tuple[str, nn.Module]] = field(default_factory=list)
    checked_epoch: int = -1
    memory_plan: Any = None  # the planner.MemoryPlan chosen by convert(memory_budget=...)
    # The form of each optional argument in ``args`` (NOTE [ Optional inputs ] in _trace.py).
    arg_forms: dict[str, Any] = field(default_factory=dict)


class _Ref(str):
    """A node name inside the stored output structure."""


# ----------------------------------------------------------------------------------------------
# The pass


def _trace(model: nn.Module, method: str, leaves: Sequence[nn.Module] = (),
           inputs: tuple[list[str], dict[str, Any]] | None = None) -> fx.Graph:
    try:
        return trace_method(model, method, leaves, inputs)
    except Exception as e:  # torch.fx raises many exception types
        raise _Untraceable(
            f"revify.convert: torch.fx cannot trace {type(model).__name__}.{method}: "
            f"{type(e).__name__}: {e}. Make the offending module a timm notrace module "
            "(timm.layers.register_notrace_module) or convert a traceable submodule instead"
        ) from e


def _lca(paths: list[list[str]]) -> str:
    common: list[str] = []
    for level in zip(*paths, strict=False):
        if all(p == level[0] for p in level):
            common.append(level[0])
        else:
            break
    return common[-1] if common else ""


_LAYOUT_METHODS = frozenset({
    "reshape", "view", "permute", "transpose", "flatten", "unflatten", "contiguous",
    "squeeze", "unsqueeze", "size", "dim",
})
_LAYOUT_FUNCTIONS = frozenset({
    torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, getattr, operator.getitem,
})


def _is_layout(node: fx.Node) -> bool:
    """Metadata reads and reshapes: the glue a block may hold around its residuals (Swin)."""
    if node.op == "get_attr" or tensor_shape(node) is None:
        return True
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    return node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS


def _residual_body(scope: set[fx.Node], identity: list[Residual]) -> list[Residual] | None:
    """The residuals making up ``scope`` if it is one same-shape map built of identity
    residuals and layout glue, with a single tensor input and a single output; else None.

    Such a map is ``h -> h + (sum of branches)`` up to reshapes, so ``U(h) - h`` is a proper
    residual branch for the coupling.
    """
    # (attribute reads may lie outside: each reader fetches them itself)
    inside = [q for q in identity if all(n in scope or n.op == "get_attr" for n in q.members)]
    nested = {n for q in inside for n in q.region}
    top = [q for q in inside if q.add not in nested]
    if not top:
        return None
    covered = set().union(*(q.members for q in top))
    if not all(_is_layout(n) for n in scope - covered):
        return None
    entries = {
        a for n in scope for a in n.all_input_nodes if a not in scope and a.op != "get_attr"
    }
    exits = [n for n in scope if any(u not in scope for u in n.users)]
    if not exits:  # a call whose output nothing reads (the last block of an unused branch)
        exits = [n for n in scope if not n.users and tensor_shape(n) is not None]
    if len(entries) != 1 or len(exits) != 1:
        return None
    (entry,), (out,) = entries, exits
    if tensor_shape(entry) is None or tensor_shape(entry) != tensor_shape(out):
        return None
    return top


def _unit_modules(graph: fx.Graph, identity: list[Residual]) -> dict[str, list[Residual]]:
    """Modules whose forward is made of identity residuals (a ResNet ``Bottleneck``, a ViT or
    Swin block): each becomes one unit ``U(h) - h``, run eagerly. Innermost such modules."""
    found: dict[str, list[Residual]] = {}
    tried: set[str] = set()
    for r in identity:
        # One call of the module: a module called twice (``self.body(self.body(x))``) has the
        # nodes of both calls under its path. Attribute reads sit where they were first made
        # (a buffer read by the trunk and passed on, NOTE [ Meta constants ]): not a call.
        call = _lca([module_calls(n) for n in r.members if n.op != "get_attr"])
        if not call:
            continue
        path = next(p for n in r.members for k, p in zip(module_calls(n), module_path(n),
                                                         strict=True) if k == call)
        if path in tried:
            continue
        tried.add(path)
        body = _residual_body({n for n in graph.nodes if call in module_calls(n)}, identity)
        if body is not None:
            found[path] = body
    return found


def _probe_leaves(model: nn.Module, graph: fx.Graph, taken: set[str]) -> dict[str, list[Residual]]:
    """Leaf modules that hide a residual unit (timm marks ``NormFreeBlock`` notrace): trace
    each same-shape custom leaf on its own and keep those whose body is residual."""
    found: dict[str, list[Residual]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target in taken or len(node.args) != 1:
            continue
        module = model.get_submodule(node.target)
        (h,) = node.args
        if type(module).__module__.startswith("torch.") or not isinstance(h, fx.Node):
            continue
        if isinstance(module, _BatchNorm):  # a norm layer never hides a residual
            continue
        if any(p in taken for p in _prefixes(node.target)):
            continue
        meta = h.meta.get("tensor_meta")
        if meta is None or tensor_shape(node) != meta.shape or node.kwargs:
            continue
        try:
            g = trace_method(module, "forward")
            propagate_shapes(module, g, (torch.zeros(meta.shape, dtype=meta.dtype),))
        except Exception:  # not traceable on its own: it stays an opaque leaf
            continue
        identity = [r for r in find_residuals(g) if r.kind == "identity"]
        scope = {n for n in g.nodes if n.op not in ("placeholder", "output")}
        body = _residual_body(scope, identity)
        if body is not None:
            found[str(node.target)] = body
    return found


def _params_of(model: nn.Module, nodes: Sequence[fx.Node]) -> tuple[list[nn.Module], _Reads]:
    """Modules called by ``nodes``, and where they read their tensors (parameters, buffers,
    get_attr), by path."""
    modules: dict[int, nn.Module] = {}
    paths: list[str] = []
    attrs: list[str] = []
    for n in nodes:
        if n.op == "call_module":
            m = model.get_submodule(n.target)
            if id(m) not in modules:
                modules[id(m)] = m
                paths.append(str(n.target))
        elif n.op == "get_attr" and str(n.target) not in attrs:
            attrs.append(str(n.target))
    return list(modules.values()), _Reads(model, paths, attrs)


def _build_plan(model: nn.Module, inputs: tuple[Any, ...], options: dict[str, Any],
                kwargs: dict[str, Any] | None = None, method: str | None = None,
                constants: bool = False) -> Plan:
    """The plan for ``model``'s trunk method (or ``method``) called with ``inputs`` (and
    ``kwargs``): optional arguments given as tensors are traced as inputs (NOTE [ Optional
    inputs ] in _trace.py); with ``constants``, those given as other values as constants."""
    method = method or entry_method(model)
    try:
        args, forms, flat = bind_inputs(model, method, inputs, kwargs, constants)
    except TypeError as e:
        raise ConversionError(
            f"revify.convert: {e}; pass example_input= as the arguments the trunk takes"
        ) from e
    spec = (args, forms)
    inputs = tuple(flat)
    for a in inputs:
        if isinstance(a, Tensor) and not a.is_floating_point():
            raise TypeError(
                f"revify.convert: example_input must be floating point, got {a.dtype}"
            )

    # 1-2. Fine graph: find units and the modules that are whole units.
    fine = _trace(model, method, (), spec)
    _propagate(model, fine, inputs, method)
    residuals = find_residuals(fine)
    identity = [r for r in residuals if r.kind == "identity"]
    unit_modules = _unit_modules(fine, identity)
    unit_modules.update(_probe_leaves(model, fine, set(unit_modules)))
    # Modules enclosing a residual add must be traced through; all others can stay leaves.
    holding = {p for r in identity for n in (r.add, r.post) if n for p in _owner_paths(n)}
    holding |= {p for path in unit_modules for p in _prefixes(path)[:-1]}
    leaves = [m for p, m in model.named_modules() if p and (p in unit_modules or p not in holding)]

    # 3. Coarse graph: units are module calls or inline regions.
    coarse = _trace(model, method, leaves, spec)
    _check_training_independent(model, method, leaves, coarse, spec)
    _propagate(model, coarse, inputs, method)
    _check_trace_computes_method(model, method, coarse, spec, inputs)
    units: list[Unit] = []
    rejected: dict[str, str] = {}  # unit modules whose other call arguments cannot be side inputs
    for n in coarse.nodes:
        if n.op == "call_module" and n.target in unit_modules and n.args:
            h = n.args[0]
            if not (isinstance(h, fx.Node) and tensor_shape(h) == tensor_shape(n) is not None):
                continue
            why = _side_problem(n)
            if why:
                rejected[str(n.target)] = f"identity residual, but {why}"
            else:
                units.append(Unit(h, n, {n}, side_args=n.args[1:], side_kwargs=dict(n.kwargs)))
    unit_calls = {u.exit for u in units}
    inline = [r for r in find_residuals(coarse)
              if r.kind == "identity" and not unit_calls & set(r.region)]
    nested = {n for r in inline for n in r.region}
    for r in inline:
        if r.add in nested:
            continue  # inside another unit's branch (y = x + f(x) read only by g): part of it
        if r.post is not None and r.post in unit_calls:
            r.post = None  # the add feeds the next unit, not an activation of this one
        units.append(Unit(r.entry, r.exit, r.members, r))
    order = {n: i for i, n in enumerate(coarse.nodes)}
    units.sort(key=lambda u: order[u.exit])
    refused: dict[str, str] = {}
    while True:  # the in-place check assumes every unit's output is a stage's: make it true
        units, why = check_units(coarse, units)
        refused.update(why)
        # a state read outside its chain is handed out by the stage unless something writes
        # into it (NOTE [ Taps ] in coupling.py)
        written = written_values(coarse, {u.exit for u in units})
        found = [c for c in chains(units, lambda e, w=written: e not in w)
                 if len(c) >= options["min_units"]]
        kept = {id(u) for c in found for u in c}
        if len(kept) == len(units):
            break
        units = [u for u in units if id(u) in kept]
    try:
        clone_foreign_writes(coarse, found)
    except InplaceError as e:
        raise ConversionError(
            f"revify.convert: {type(model).__name__}.{method}: {e}; a converted model keeps "
            "stage outputs and checkpointed inputs for backward"
        ) from e

    for exit_name, why in refused.items():
        rejected[_refused_path(coarse, exit_name)] = f"identity residual, but {why}"
    report = _report_residuals(residuals, unit_modules, found, options, rejected)
    made = [_make_stage(model, c, options, unit_modules) for c in found]
    stage_list = [st for st, _ in made]
    steps, segments = _make_steps(model, coarse, found, stage_list, options, report)
    output = next(n for n in coarse.nodes if n.op == "output").args[0]
    output = fx.node.map_arg(output, lambda n: _Ref(n.name))
    blocks = []
    for step in steps:
        if isinstance(step.run, ReversibleStage):
            blocks += [
                Block(u.name, step.run.name, "reversible", u.pattern) for u in step.run.units
            ]
        else:
            kind = "checkpointed" if step.run.checkpoint else "unchanged"
            base = step.run.name.split(" [")[0]  # a part of a segment (NOTE [ Nested plans ])
            role = "stem" if base == "stem" else base == "tail" and "tail"
            role = role or "transition"
            blocks += [Block(p, step.run.name, kind, role) for p in step.run.calls]
    placeholders = [n.name for n in coarse.nodes if n.op == "placeholder"]
    return Plan(
        method, args, steps, output, stage_list, segments, report, options, blocks, placeholders,
        holders=[holder for _, holder in made], arg_forms=forms,
    )


def _refused_path(graph: fx.Graph, exit_name: str) -> str:
    """Report key of a unit the in-place check refused: its module, or its add's owner."""
    node = next(n for n in graph.nodes if n.name == exit_name)
    if node.op == "call_module":
        return str(node.target)
    owners = _owner_paths(node)
    return owners[-1] if owners else node.name


def _propagate(model: nn.Module, graph: fx.Graph, inputs: tuple[Any, ...], method: str) -> None:
    try:
        propagate_shapes(model, graph, inputs)
    except Exception as e:
        shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in inputs]
        hooked = [name for name, m in model.named_modules()
                  if forward_hooked([m], globals_checked=True) is not None]
        fix = "pass example_input= with the shape the model expects"
        if hooked:  # timm's FeatureHookNet (features_only, feature_cls="hook") collects so
            fix = (
                f"its modules {', '.join(hooked[:3])}{', ...' if len(hooked) > 3 else ''} have "
                "forward hooks, which tracing runs on placeholders (a model collecting its "
                "features with hooks: timm's features_only FeatureHookNet); convert the model "
                "before registering them, or for timm use features_only=True with "
                "feature_cls='getter' (its forward_intermediates converts)"
                + ("" if type(model).__name__ == "FeatureHookNet" else f"; or {fix}")
            )
        raise ConversionError(
            f"revify.convert: running {type(model).__name__}.{method} on example inputs of "
            f"shape {shapes} failed ({type(e).__name__}: {e}); {fix}"
        ) from e


def _check_training_independent(
    model: nn.Module, method: str, leaves: Sequence[nn.Module], graph: fx.Graph,
    spec: tuple[list[str], dict[str, Any]] | None = None,
) -> None:
    """Tracing freezes Python branches on ``self.training``: refuse if train and eval differ."""
    with training_kept(model):
        model.train(not model.training)
        other = _trace(model, method, leaves, spec)
    if other.python_code("self").src != graph.python_code("self").src:
        raise _Untraceable(
            f"revify.convert: {type(model).__name__}.{method} takes different code paths in "
            "train and eval mode outside its submodules; a traced copy would freeze one of "
            "them. Move the mode-dependent code into a module (e.g. nn.Dropout)"
        )


# NOTE [ Trace check ]
# Everything revify installs is generated from the traced graph, so a trace that computes
# something else than the model's own code is a silent change of the model. torch.fx can record
# such a graph without complaint: ``x += f(x)`` is recorded as ``x = x + f(x)``, so another name
# for the old ``x`` (``y = x`` before it) reads the value before the add in the graph and the
# value after it in eager PyTorch (max output difference 0.05 on a small net, no error). So
# the coarse graph is run once at conversion beside ``model.<method>`` on a random input of the
# example's shapes (eval mode, no grad, the model's buffers and the global RNG put back), and a
# difference refuses the trace: convert falls back to the submodules, each checked the same way.
# The method runs twice first: a model whose value changes between two calls on one input
# (Python state such as a call counter; the runtime mismatch check watches its units) gives no
# reference, and is not checked. Models on the meta device have no values and are not checked.
# Python state the forward changes (counters) changes at conversion, as tracing changes it.


def _check_trace_computes_method(
    model: nn.Module, method: str, graph: fx.Graph, spec: tuple[list[str], dict[str, Any]],
    inputs: tuple[Any, ...],
) -> None:
    """Refuse ``graph`` if it computes another value than ``model.<method>`` (NOTE
    [ Trace check ])."""
    worst = _trace_difference(model, method, graph, spec, inputs)
    if worst:
        raise _Untraceable(
            f"revify.convert: the torch.fx trace of {type(model).__name__}.{method} computes "
            f"another value than the method itself on a random input ({worst}); most often an "
            "in-place op on a tensor that has another name (y = x; x += f(x)), which torch.fx "
            "records out of place. Write it out of place (x = x + f(x)) or convert a submodule"
        )


def _trace_difference(
    model: nn.Module, method: str, graph: fx.Graph, spec: tuple[list[str], dict[str, Any]] | None,
    inputs: tuple[Any, ...],
) -> str | None:
    """How ``graph`` computes another value than ``model.<method>`` on a random input of the
    shapes of ``inputs`` ("" where it agrees), or None where that cannot be checked: meta or
    fake tensors, or a method that raises or gives two values on the same input."""
    state = [*model.parameters(), *model.buffers()]
    if any(t.is_meta or is_fake(t) for t in state + [a for a in inputs if isinstance(a, Tensor)]):
        return None
    entry = method_entry(model, method, spec)
    failed = None
    with _probing(model, inputs) as xs:
        model.eval()
        try:
            want = tree_leaves(entry(*xs))
            again = tree_leaves(entry(*xs))
        except Exception:  # the method itself fails on a random input: no reference
            return None
        if _difference(want, again):  # it gives another value when called again: neither
            return None
        try:
            got = tree_leaves(fx.GraphModule(model, graph)(*xs))
        except Exception as e:
            failed = f"{type(e).__name__}: {e}"
    return f"the traced copy raised {failed}" if failed else _difference(want, got)


# Programs already made for modules (by id): a second plan of the same model (timm's
# forward_intermediates, NOTE [ Intermediates ] in _install.py) reuses the trunk's instead of
# tracing and checking each unit module again.
_KNOWN_PROGRAMS: contextvars.ContextVar[dict[int, UnitProgram] | None] = contextvars.ContextVar(
    "revify_known_programs", default=None)


@contextlib.contextmanager
def programs_known(plan: Plan) -> Iterator[None]:
    """Within the body, :func:`_unit_program` returns ``plan``'s unit programs for their
    modules (they depend on the module only: its forward, traced once and checked)."""
    known = {id(u.module): u.program for st in plan.stages for u in st.units
             if getattr(u, "program", None) is not None}
    token = _KNOWN_PROGRAMS.set(known)
    try:
        yield
    finally:
        _KNOWN_PROGRAMS.reset(token)


def _unit_program(module: nn.Module, h: Any) -> UnitProgram | None:
    """``module``'s forward as code with direct submodule calls (NOTE [ Direct calls ] in
    _direct.py), where its trace takes one code path in train and eval mode, computes what the
    forward computes on a random input of ``h``'s shape (the unit's input node, or a tensor) and
    the forward sets none of the module's own attributes or buffers; else None, and the unit
    calls the module. Its submodules with submodules of their own get programs the same way."""
    known = _KNOWN_PROGRAMS.get()
    if known is not None and id(module) in known:
        return known[id(module)]
    if isinstance(h, fx.Node):
        meta = h.meta.get("tensor_meta")
        if meta is None:
            return None
        device = next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device
        h = torch.empty(meta.shape, dtype=meta.dtype, device=device)
    if (not isinstance(h, Tensor) or not h.is_floating_point() or "forward" in module.__dict__
            or len(required_args(module, "forward")) != 1):
        return None
    inputs = _eager_inputs(module, h)  # of its children; None where it changes itself
    if inputs is None:
        return None
    buffers = set(module._buffers)
    children = list(module.modules())[1:]  # each runs its own forward, as called
    try:
        graph = _trace(module, "forward", children)
        _check_training_independent(module, "forward", children, graph)
    except _Untraceable:
        return None
    finally:
        added = set(module._buffers) - buffers
    if added:  # tensor constants the trace would keep as buffers: leave the module as it was
        for name in added:
            del module._buffers[name]
        return None
    if _trace_difference(module, "forward", graph, None, (h,)) != "":
        return None
    programs = {}
    for n in graph.nodes:  # its children with children of their own, called with one input
        path = str(n.target)
        if (n.op == "call_module" and path in inputs and len(n.args) == 1 and not n.kwargs
                and path not in programs and module.get_submodule(path)._modules):
            program = _unit_program(module.get_submodule(path), inputs[path])
            if program is not None:
                programs[path] = program
    return UnitProgram(module, GraphCode(graph, module, programs))


@contextlib.contextmanager
def _probing(model: nn.Module, inputs: Sequence[Any]) -> Iterator[list[Any]]:
    """Random inputs like ``inputs`` (seeded normal values for floating-point tensors, the rest
    as given), for calls of ``model`` that leave nothing changed: no grad, and the global RNG,
    the buffers and every training flag put back afterwards."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(a.shape, generator=gen, dtype=a.dtype).to(a.device)
          if isinstance(a, Tensor) and a.is_floating_point() else a for a in inputs]
    tensors = [*model.parameters(), *model.buffers(), *(a for a in xs if isinstance(a, Tensor))]
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with training_kept(model), torch.no_grad(), torch.random.fork_rng(devices=devices), \
            buffers_kept(model):
        yield xs


def _eager_inputs(module: nn.Module, example: Tensor) -> dict[str, Tensor] | None:
    """Call ``module`` in train and then eval mode on a random input like ``example``
    (:func:`_probing`): None if a call raises or sets one of the module's own attributes or
    writes one of its own buffers (a trace of it would do that once, when traced, not at every
    call; its submodules' are theirs); else, by name, an empty tensor like the one input each
    child was called with (children called otherwise are left out). Everything is put back."""
    attrs = dict(module.__dict__)
    own = [(k, b, b._version) for k, b in module._buffers.items() if b is not None]
    seen: dict[str, Tensor] = {}

    def hook(name: str) -> Any:
        def record(_: nn.Module, args: tuple[Any, ...]) -> None:
            if len(args) == 1 and isinstance(args[0], Tensor):
                seen.setdefault(name, torch.empty_like(args[0]))
        return record

    handles = [child.register_forward_pre_hook(hook(name))
               for name, child in module.named_children()]
    try:
        with _probing(module, [example]) as (x,):
            for train in (True, False):
                module.train(train)
                seen.clear()
                try:
                    module(x)
                except Exception:  # noqa: BLE001 - not checkable: no program
                    return None
                now = module.__dict__
                if now.keys() != attrs.keys() or any(
                    now[k] is not v for k, v in attrs.items() if k != "training"
                ) or any(module._buffers.get(k) is not b or b._version != v for k, b, v in own):
                    return None
        return seen
    finally:
        for handle in handles:
            handle.remove()
        for k in [k for k in module.__dict__ if k not in attrs]:
            del module.__dict__[k]
        module.__dict__.update(attrs)


def _programs(model: nn.Module, nodes: Sequence[fx.Node]) -> dict[str, UnitProgram]:
    """By path, the :func:`_unit_program` of each module with submodules that ``nodes`` call
    with one input (a segment's transition blocks)."""
    out: dict[str, UnitProgram] = {}
    for n in nodes:
        path = str(n.target)
        if n.op != "call_module" or path in out or len(n.args) != 1 or n.kwargs:
            continue
        module = model.get_submodule(path)
        if module._modules:
            program = _unit_program(module, n.args[0])
            if program is not None:
                out[path] = program
    return out


def _difference(want: list[Any], got: list[Any]) -> str:
    """How outputs ``got`` differ from ``want`` beyond rounding, or "" where they agree."""
    if len(want) != len(got):
        return f"{len(got)} outputs instead of {len(want)}"
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if not isinstance(w, Tensor) or not isinstance(g, Tensor):
            if type(w) is not type(g) or (not isinstance(w, Tensor) and w != g):
                return f"output {i}: {g!r} instead of {w!r}"
            continue
        if w.shape != g.shape or w.dtype != g.dtype:
            return f"output {i}: {tuple(g.shape)} {g.dtype} instead of {tuple(w.shape)} {w.dtype}"
        if not w.is_floating_point():
            if not torch.equal(w, g):
                return f"output {i} differs"
            continue
        if not torch.equal(w.isnan(), g.isnan()):
            return f"output {i}: NaN in other places"
        w, g = w.nan_to_num(), g.nan_to_num()
        scale = w.abs().max().item() if w.numel() else 0.0
        err = (w - g).abs().max().item() if w.numel() else 0.0
        if err > 1e-4 * scale + 1e-30:
            return f"output {i}: max difference {err:.3g} at scale {scale:.3g}"
    return ""


def _pattern(residuals: list[Residual]) -> str:
    """Name the residual pattern a whole-module unit matched, for reports."""
    if len(residuals) > 1:
        return f"{len(residuals)}-residual block (transformer)"
    (r,) = residuals
    if r.post is not None:
        return "act(x + F(x)) block (ResNet v1)"
    if r.skip:
        return "x + F(x), Identity shortcut"
    return "x + F(x) block (pre-activation)"


def _side_problem(call: fx.Node) -> str | None:
    """Why a unit module's other call arguments cannot be passed to it as they are, or None.

    Constants and model attributes (EVA-02's ``rope=``, a buffer) are; a value computed in the
    trunk would have to be computed before the stage and kept for its backward: not supported.
    """
    nodes: list[fx.Node] = []
    fx.node.map_arg((call.args[1:], call.kwargs), nodes.append)
    for n in nodes:
        if n.op != "get_attr":
            return (f"it is called with a computed value ({n.name}) besides its input; only "
                    "constants and model attributes are supported there")
    return None


def _make_stage(
    model: nn.Module,
    chain: list[Unit],
    options: dict[str, Any],
    unit_modules: dict[str, list[Residual]],
) -> tuple[ReversibleStage, str]:
    """The stage running ``chain``, and the path of the module holding the whole chain (the
    units' common parent; ``""`` when it is the traced module itself)."""
    made = []
    paths = []
    for u in chain:
        if u.residual is None:
            path = str(u.exit.target)
            args, kwargs = fx.node.map_arg(
                (u.side_args, u.side_kwargs), lambda n: _Attr(model, str(n.target))
            )
            module = model.get_submodule(path)
            made.append(_ModuleUnit(path, module, args, kwargs))
            if not args and not kwargs:
                made[-1].program = _unit_program(module, u.entry)
            made[-1].pattern = _pattern(unit_modules[path])
            made[-1].copy_input = u.writes_input
            if u.writes_input:
                made[-1].pattern += ", writes its input (run on a copy)"
            paths.append(_prefixes(path)[:-1])
            continue
        r = u.residual
        only = r.region[0] if len(r.region) == 1 else None
        owner, rank = _add_key(r)
        name = f"{owner or type(model).__name__}:residual{rank}"
        # The whole unit U(h), run as U(h) - h: with a post-add op (relu(x + F(x))), a scaled
        # branch (torch.add(x, F(x), alpha=a)), or when it writes h in place (it then writes a
        # copy, and the add must read that copy as the original's did).
        whole = r.post is not None or r.scale != 1 or u.writes_input
        if (
            not whole
            and only is not None
            and only.op == "call_module"
            and only.args == (r.entry,)
            and not only.kwargs
        ):
            made.append(_BranchUnit(str(only.target), model.get_submodule(only.target)))
            made[-1].pattern = "inline x + f(x)"
        else:
            nodes = r.region + (r.skip[::-1] + [r.add] if whole else [])
            nodes += [r.post] if r.post is not None else []
            out = r.exit if whole else r.branch
            code = GraphCode(extract(nodes, [r.entry], [out]), model)
            modules, reads = _params_of(model, nodes)
            made.append(_GraphUnit(name, code, model, modules, reads, subtract_input=whole))
            made[-1].copy_input = u.writes_input
            made[-1].pattern = (
                "inline act(x + F(x))" if r.post is not None
                else f"inline torch.add(x, F(x), alpha={r.scale:g})" if r.scale != 1
                else "inline x + F(x)"
            )
        if u.writes_input:
            made[-1].pattern += ", writes its input (run on a copy)"
        paths.append(_prefixes(r.owner))
    lca = _lca(paths)  # the module holding the whole chain
    label = lca or (made[0].name if len(made) == 1 else f"{made[0].name}..{made[-1].name}")
    stage = ReversibleStage(
        label, made, alpha=options["alpha"], beta=options["beta"], exact=options["exact"]
    )
    return stage, lca


def _make_steps(
    model: nn.Module,
    graph: fx.Graph,
    found: list[list[Unit]],
    stage_list: list[ReversibleStage],
    options: dict[str, Any],
    report: list[ReportLine],
) -> tuple[list[_Step], list[Segment]]:
    """Split the coarse graph into segments and stages in execution order."""
    members = {n for chain in found for u in chain for n in u.members}
    before = chains_before(graph, found)
    buckets: list[list[fx.Node]] = [[] for _ in range(len(found) + 1)]
    for n in graph.nodes:
        if n.op in ("placeholder", "output") or n in members:
            continue
        if n.op == "get_attr" and all(u.op != "output" for u in n.users):
            continue  # attributes are fetched by each step that reads them (_make_segment)
        buckets[before[n]].append(n)

    steps: list[_Step] = []
    segments: list[Segment] = []
    for i in range(len(found) + 1):
        parts = _around_nested_plans(model, buckets[i])
        for j, (nodes, nested) in enumerate(parts):
            # one of several segments between two stages: named after the nested call
            part = (f" [{nodes[0].target}]" if nested
                    else f" [after {parts[j - 1][0][0].target}]" if j else "")
            step = _make_segment(model, graph, nodes, i, len(found), stage_list, options, report,
                                 nested, part)
            segments.append(step.run)
            steps.append(step)
        if i < len(found):
            chain = found[i]
            taps = [k + 1 for k, u in enumerate(chain[:-1])
                    if any(user not in chain[k + 1].members for user in u.exit.users)]
            steps.append(_Step(
                stage_list[i], [chain[0].entry.name],
                [chain[-1].exit.name, *(chain[j - 1].exit.name for j in taps)], taps=taps,
            ))
    # Release each value after its last use so the plan keeps nothing alive.
    last: dict[str, int] = {}
    for si, st in enumerate(steps):
        for name in st.inputs:
            last[name] = si
    output_names = set()
    fx.node.map_arg(
        next(n for n in graph.nodes if n.op == "output").args[0],
        lambda n: output_names.add(n.name),
    )
    for name, si in last.items():
        if name not in output_names:
            steps[si].release.append(name)
    return steps, segments


# NOTE [ Nested plans ]
# A module holding a stage of its parent's plan runs that stage when called directly
# (``_install_containers``), and so does its parent when *it* is called directly: the plan of
# MobileNetV3's ``blocks`` (built when torch.fx feature extraction calls it) calls ``blocks.1``,
# which runs the stage ``blocks.1``. Inside a checkpointed segment that stage would run again in
# the segment's recompute, reading the stand-ins the recompute puts in the parameters' slots
# (NOTE [ Recompute leaves ] in _replay.py), and its own backward, run after the stand-ins are
# gone, then refused: "parameters are not the ones the forward used". So each call of a module
# that runs a plan of its own is a segment of its own, never checkpointed: its stage is
# reversible and its plan checkpoints its own layers already. The layers around it are
# segments as usual.


def _runs_plan(module: nn.Module) -> bool:
    """Whether calling ``module`` runs a revify plan (its own or a stage of its parent's)."""
    from ._install import _LazyContainer  # _install imports this module

    return _PLAN in module.__dict__ or isinstance(module.__dict__.get("forward"), _LazyContainer)


def _around_nested_plans(
    model: nn.Module, nodes: list[fx.Node]
) -> list[tuple[list[fx.Node], bool]]:
    """``nodes`` (one segment's, in order) cut into runs around each call of a module that runs
    a plan of its own, with whether the run is such a call (NOTE [ Nested plans ])."""
    out: list[tuple[list[fx.Node], bool]] = []
    for n in nodes:
        nested = n.op == "call_module" and _runs_plan(model.get_submodule(str(n.target)))
        if nested or not out or out[-1][1]:
            out.append(([n], nested))
        else:
            out[-1][0].append(n)
    return out


def _make_segment(
    model: nn.Module,
    graph: fx.Graph,
    nodes: list[fx.Node],
    index: int,
    n_chains: int,
    stage_list: list[ReversibleStage],
    options: dict[str, Any],
    report: list[ReportLine],
    nested: bool = False,
    part: str = "",
) -> _Step:
    """One segment of the plan; ``nested``: a call of a module running its own plan, left
    unchanged (NOTE [ Nested plans ]), ``part`` then added to the segment's name."""
    # Attributes are fetched by the code that reads them, never passed between steps.
    attrs = [a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"]
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(set(nodes) | set(attrs), key=order.__getitem__)
    inside = set(nodes)
    ins: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in ins:
                ins.append(a)
    outs = [
        n for n in nodes
        if any(u not in inside and (n.op != "get_attr" or u.op == "output") for u in n.users)
    ]
    modules, reads = _params_of(model, nodes)
    if index == 0:
        name, wanted = "stem", options["checkpoint_stem"]
    elif index == n_chains:
        name, wanted = "tail", False
    else:
        name = f"{stage_list[index - 1].name} -> {stage_list[index].name}"
        wanted = options["checkpoint_transitions"]
    name += part
    # the modules' parameters and buffers, and get_attr tensors
    has_params = bool(read_slots(_slots(reads.owners())))
    tensor_outputs = all(tensor_shape(o) is not None for o in outs)
    # The planner may checkpoint a segment the options left stored (not the tail: its
    # backward follows its forward at once, a recompute there saves nothing).
    checkpointable = has_params and tensor_outputs and index != n_chains and not nested
    checkpoint = wanted and checkpointable
    labels = sorted({str(n.target) for n in nodes if n.op == "call_module"}, key=_natural)
    detail = ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "")
    if checkpoint:
        report.append(ReportLine(name, "checkpointed", detail))
    else:
        why = (
            "tail after the last stage" if index == n_chains else
            "runs its own converted plan" if nested else
            "disabled by option" if not wanted else
            "no parameters" if not has_params else "non-tensor outputs"
        )
        report.append(ReportLine(name, "unchanged", f"{detail} ({why})"))
    calls = [str(n.target) for n in nodes if n.op == "call_module"]
    programs = _programs(model, nodes)
    code = GraphCode(extract(nodes, ins, outs), model, programs)
    pieces: list[Any] | None = None
    if checkpointable:
        # NOTE [ Segment pieces ]: of the cuts at blocks and those also at whole blocks called
        # from the traced module, the ones whose simulated backward peak is lower
        options = [_piece_cuts(model, nodes, ins, outs, whole_blocks=w) for w in (False, True)]
        made = [
            [GraphCode(extract(*cut), model, programs) for cut in cuts] if len(cuts) > 1
            else None
            for cuts in options
        ]
        pieces = made[0]
        if len(options[1]) > len(options[0]):
            peaks = [_segment_peak(model, code, p, modules, reads, ins) for p in made]
            if None not in peaks and peaks[1] < peaks[0]:
                pieces = made[1]
    seg = Segment(name, code, model, modules, reads, checkpoint, calls, pieces=pieces)
    seg.checkpointable = checkpointable
    return _Step(seg, [a.name for a in ins], [o.name for o in outs])


def _segment_peak(model: nn.Module, code: Any, pieces: list[Any] | None,
                  modules: Sequence[nn.Module], reads: Any, ins: list[fx.Node]) -> int | None:
    """Peak live bytes of a checkpointed segment's train-mode forward and backward run with
    ``pieces``, on fake tensors of the traced input shapes (None when an input is not a
    tensor, or the simulation fails: the caller keeps its default)."""
    from ._simulate import LiveBytes, fake_model
    from .audit import _train_mode

    metas = [n.meta.get("tensor_meta") for n in ins]
    if any(getattr(m, "shape", None) is None for m in metas):
        return None
    seg = Segment("(sizing pieces)", code, model, modules, reads, True, pieces=pieces)
    live = LiveBytes()
    try:
        with _train_mode(model), fake_model(model), torch.enable_grad():
            xs = [torch.empty(m.shape, dtype=m.dtype).requires_grad_(m.dtype.is_floating_point)
                  for m in metas]
            with live:
                outs = [o for o in seg(*xs) if isinstance(o, Tensor) and o.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                del outs
    except Exception:
        return None
    return live.peak


# NOTE [ Segment pieces ]
# A checkpointed segment recomputes one piece at a time in backward, keeping every piece's
# input meanwhile (checkpoint._segment_backward): a cut lowers the peak when the blocks it
# separates hold more activations than the tensor it keeps. Cuts at blocks the trunk traces
# through always paid on the models surveyed. Whole blocks called from the traced module (a
# stage left a leaf because it holds no identity unit, such as RegNet's one-block s1 and s2)
# are a closer call: cutting there lowered RegNetX/Y-002, RegNetZ-005 and DLA-34's peaks by
# 10-14 % but raised EfficientNet-B0's and MobileNetV2's by 5-9 % (a full-resolution stem output
# kept for a small first block). So both are simulated at conversion, on fake tensors of the
# example's shapes, and the lower peak is kept.


def _piece_cuts(
    model: nn.Module, nodes: list[fx.Node], ins: list[fx.Node], outs: list[fx.Node],
    whole_blocks: bool = False,
) -> list[tuple[list[fx.Node], list[fx.Node], list[fx.Node]]]:
    """Split a checkpointed segment into pieces (nodes, inputs, outputs) at the blocks it calls.

    A cut goes where one tensor alone crosses and the enclosing block changes (the stem and a
    first projection block, say; with ``whole_blocks``, also between blocks called whole from
    the traced module, NOTE [ Segment pieces ]), and every piece calls a module with
    parameters. The segment
    backward then recomputes piece by piece, so its working set is one block's, not the whole
    segment's (``checkpoint._segment_backward``)."""
    body = [n for n in nodes if n.op != "get_attr"]
    pos = {n: i for i, n in enumerate(body)}
    # last[i]: the last position using a value defined at i (len(body) for segment outputs).
    last = [len(body) if n in outs else max((pos[u] for u in n.users if u in pos), default=i)
            for i, n in enumerate(body)]
    ins_last = max((pos[u] for a in ins for u in a.users if u in pos), default=-1)

    def key(n: fx.Node) -> str:
        owners = _owner_paths(n)
        if not owners and whole_blocks and n.op == "call_module":
            # a block called whole from the traced module (NOTE [ Segment pieces ])
            module = model.get_submodule(str(n.target))
            return str(n.target) if next(module.children(), None) is not None else ""
        return owners[min(1, len(owners) - 1)] if owners else ""

    def has_params(piece: list[fx.Node]) -> bool:
        return any(
            n.op == "call_module" and any(True for _ in model.get_submodule(n.target).parameters())
            for n in piece
        )

    # A value written in place later in the segment cannot be a piece's input: the piece's
    # recompute would write the saved value again (_inplace.py).
    written = written_from(body)
    by_name = {n.name: n for n in body[0].graph.nodes} if body else {}
    cross: dict[int, fx.Node] = {}  # start of a piece -> the one value that crosses into it
    for i in range(1, len(body)):
        crossing = [j for j in range(i) if last[j] >= i]
        if (
            i > ins_last
            and len(crossing) == 1
            and tensor_shape(body[crossing[0]]) is not None
            and key(body[i]) != key(body[i - 1])
            and storage(body[crossing[0]], by_name) not in written[i]
        ):
            cross[i] = body[crossing[0]]
    starts = [0, *cross]
    groups = [body[a:b] for a, b in zip(starts, [*starts[1:], len(body)], strict=True)]
    merged: list[list[fx.Node]] = []
    for g in groups:
        # A piece without parameters, or not fed by the piece before it, joins that piece.
        if merged and (not has_params(g) or cross[pos[g[0]]] not in merged[-1]):
            merged[-1] += g
        else:
            merged.append(list(g))
    if len(merged) > 1 and not has_params(merged[0]):
        merged[1] = merged[0] + merged[1]
        del merged[0]
    attrs = [n for n in nodes if n.op == "get_attr"]
    order = {n: j for j, n in enumerate(nodes)}
    cuts = []
    for i, g in enumerate(merged):
        inside = set(g)
        used = [a for a in attrs if any(u in inside for u in a.users)]
        piece_ins = ins if i == 0 else [cross[pos[g[0]]]]
        piece_outs = outs if i == len(merged) - 1 else [cross[pos[merged[i + 1][0]]]]
        cuts.append((sorted([*used, *g], key=order.__getitem__), piece_ins, piece_outs))
    return cuts


def _owner_paths(node: fx.Node) -> list[str]:
    """Module paths enclosing ``node``, excluding the leaf module a call_module node calls."""
    paths = module_path(node)
    return paths[:-1] if node.op == "call_module" else paths


def _prefixes(path: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]`` (module paths from the outermost)."""
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _natural(s: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in s.replace(".", " . ").split()]


def _add_key(r: Residual) -> tuple[str, int]:
    """Identify an add across traces: node names differ, (owner, rank among its adds) not.
    Adds of every spelling count (``x.add_(f(x))`` then ``x + g(x)`` are residual0 and 1)."""
    same = [
        n for n in r.add.graph.nodes if is_add(n) and module_path(n) == module_path(r.add)
    ]
    return r.owner, same.index(r.add)


def _report_residuals(
    residuals: list[Residual],
    unit_modules: dict[str, list[Residual]],
    found: list[list[Unit]],
    options: dict[str, Any],
    rejected: dict[str, str],
) -> list[ReportLine]:
    min_units = options["min_units"]
    converted_modules = {str(u.exit.target) for c in found for u in c if u.residual is None}
    converted_adds = {_add_key(u.residual) for c in found for u in c if u.residual is not None}
    in_module = {id(r): p for p, rs in unit_modules.items() for r in rs}
    lines = []
    for r in residuals:
        path = in_module.get(id(r), r.owner or r.add.name)
        inside_unit = any(path.startswith(m + ".") for m in converted_modules)
        if r.kind == "identity" and inside_unit and path not in rejected:
            continue  # nested in a unit that is reversible as a whole (ConvNeXt-V2's GRN)
        if r.kind == "identity":
            if path in converted_modules or _add_key(r) in converted_adds:
                lines.append(ReportLine(path, "reversible", "identity residual"))
            elif path in rejected:
                lines.append(ReportLine(path, "unchanged", rejected[path]))
            else:
                lines.append(ReportLine(
                    path, "unchanged",
                    f"identity residual outside any chain of >= {min_units} units "
                    "(its output feeds two units or is written in place elsewhere, or it is "
                    "nested)"))
        elif inside_unit:
            continue  # an add inside a unit that is reversible as a whole
        elif r.kind == "projection":
            kind = "checkpointed" if options["checkpoint_transitions"] else "unchanged"
            lines.append(ReportLine(path, kind, r.reason))
        else:
            lines.append(ReportLine(path, "unchanged", r.reason))
    listed = {id(r) for r in residuals}
    for path, rs in unit_modules.items():  # residuals found by tracing an opaque leaf alone
        if not any(id(r) in listed for r in rs):
            kind = "reversible" if path in converted_modules else "unchanged"
            lines.append(ReportLine(path, kind, "identity residual (inside a notrace module)"))
    return list(dict.fromkeys(lines))
