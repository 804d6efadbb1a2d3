"""Tracing with torch.fx: timm's leaf conventions, method entry points, shapes and code regions."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves

from . import _direct, _fsdp

__all__: list[str] = []

_PREFIX = "root."


def _timm_leaves() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    try:
        from timm.layers import DropPath, get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional for plain torch models
        return (), ()
    return (DropPath, *get_notrace_modules()), tuple(get_notrace_functions())


class _Tracer(fx.Tracer):
    """``fx.Tracer`` with timm's leaf modules and functions, BatchNorm, DropPath, and ``leaves``.

    DropPath must stay a module: traced through, its ``bernoulli_`` side effects hang off the
    graph and dead-code elimination would delete them (FX_SURVEY.md, corner cases 5 and 6).
    """

    def __init__(self, leaves: Iterable[nn.Module] = (), proxy_buffers: bool = False) -> None:
        leaf_types, functions = _timm_leaves()
        super().__init__(autowrap_functions=functions)
        self._leaf_types = (_BatchNorm, *leaf_types)
        self._leaf_ids = {id(m) for m in leaves}
        # NOTE [ Meta constants ]: buffers read as get_attr nodes, not as trace-time values.
        self.proxy_buffer_attributes = proxy_buffers

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._leaf_ids or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def entry_method(model: nn.Module) -> str:
    """The method that holds the trunk: timm's ``forward_features`` if present, else ``forward``.

    Rewriting ``forward_features`` keeps ``forward = forward_head(forward_features(x))`` and every
    other timm entry point consistent with the converted trunk.
    """
    ff = getattr(type(model), "forward_features", None)
    return "forward_features" if callable(ff) else "forward"


def required_args(model: nn.Module, method: str) -> list[str]:
    """Names of the method's positional parameters without defaults (the traced inputs)."""
    # The class's method: the instance may hold revify's replacement already.
    sig = inspect.signature(getattr(type(model), method))
    names = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names


# NOTE [ Optional inputs ]
# A trunk is traced with its required arguments, the optional ones at their defaults. A module
# that holds a stage may be called with more (DLA's ``tree1(x, shortcut)``, ``tree2(x1, None,
# children)`` with ``children`` a list of tensors): then each optional argument the call gives
# as a tensor, or as a list or tuple of tensors, is traced as an input too (``bind_inputs``),
# one placeholder per tensor; arguments given at their default stay constants of the trace.
# The converted method then takes exactly that form: the same arguments given as tensors, the
# others at their defaults, or it raises (``flatten_input``). A traced function that changes a
# list it was given (``children.append(x)``) would not change the caller's: refused.

_TENSOR = "tensor"


@dataclasses.dataclass(frozen=True)
class Constant:
    """The form of an optional argument traced at a value other than its default (``indices=
    [2, 5]`` of timm's ``forward_intermediates``): a constant of the trace, not an input."""

    value: Any


def bind_inputs(
    model: nn.Module, method: str, args: Sequence[Any], kwargs: dict[str, Any] | None = None,
    constants: bool = False,
) -> tuple[list[str], dict[str, Any], list[Any]]:
    """The arguments of ``model.<method>(*args, **kwargs)`` to trace as inputs: their names, the
    form of each optional one (``"tensor"``, or ``("list" | "tuple", n)`` for n tensors), and
    the input values, one per placeholder (NOTE [ Optional inputs ]). With ``constants``, an
    optional argument given as something else is traced as that value (form :class:`Constant`,
    not among the names).

    Raises:
        TypeError: the call does not fit the signature, or gives an optional argument that is
            neither its default nor tensors (nor, with ``constants``, passed by keyword).
    """
    fn = getattr(type(model), method)
    sig = inspect.signature(fn)
    required = required_args(model, method)
    try:
        bound = sig.bind(model, *args, **(kwargs or {}))
    except TypeError as e:
        raise TypeError(
            f"{type(model).__name__}.{method} takes the inputs ({', '.join(required)}) and "
            f"optional ones, but example_input gave {len(args)} ({e})"
        ) from None
    names: list[str] = []
    forms: dict[str, Any] = {}
    values: list[Any] = []
    for name, value in list(bound.arguments.items())[1:]:
        param = sig.parameters[name]
        if name in required:
            names.append(name)
            values.append(value)
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            if value:
                raise TypeError(f"{type(model).__name__}.{method} was given *{name}")
            continue
        if value is param.default:
            continue
        if isinstance(value, torch.Tensor):
            form: Any = _TENSOR
            values.append(value)
        elif type(value) in (list, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            form = (type(value).__name__, len(value))
            values.extend(value)
        elif constants and param.kind != param.POSITIONAL_ONLY and not any(
                isinstance(v, torch.Tensor) for v in tree_leaves(value)):
            forms[name] = Constant(value)
            continue
        else:
            raise TypeError(
                f"{type(model).__name__}.{method} was given {name}={_short(value)}, neither "
                f"its default ({_short(param.default)}) nor tensors"
            )
        names.append(name)
        forms[name] = form
    return names, forms, values


def flatten_input(form: Any, value: Any) -> list[Any] | None:
    """``value`` as the placeholders of an optional input traced in ``form``, or None when it
    does not have that form (NOTE [ Optional inputs ])."""
    if form == _TENSOR:
        return [value] if isinstance(value, torch.Tensor) else None
    kind, n = form
    if type(value).__name__ != kind or len(value) != n:
        return None
    return list(value) if all(isinstance(v, torch.Tensor) for v in value) else None


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else "a tensor"
    return text if len(text) <= 40 else text[:37] + "..."


def trace_method(
    model: nn.Module,
    method: str,
    leaves: Iterable[nn.Module] = (),
    inputs: tuple[list[str], dict[str, Any]] | None = None,
) -> fx.Graph:
    """Trace ``model.<method>`` called with its required arguments, optional ones at defaults
    or, with ``inputs`` (names and forms from :func:`bind_inputs`), as those say.

    Node targets and ``nn_module_stack`` paths are relative to ``model``.
    """
    built: list[Any] = []  # the lists and tuples the wrapper builds, to see them changed
    entry = _entry(model, method, inputs, built)
    graph = _trace_entry(entry, model, leaves, proxy_buffers=False)
    if _meta_constants(entry, graph):  # NOTE [ Meta constants ]
        graph = _trace_entry(entry, model, leaves, proxy_buffers=True)
        left = _meta_constants(entry, graph)
        if left:
            raise TypeError(
                f"revify: {type(model).__name__}.{method} computes {len(left)} tensor(s) of "
                f"shape {tuple(left[0].shape)} at trace time from the meta device's "
                "placeholders (not from a parameter or buffer the traced code could read "
                "later), so a converted model would keep placeholders after to_empty(); "
                "convert after materialising the model (to_empty() and initialising it)"
            )
    for value, before in built:
        if len(value) != len(before) or any(map(operator.is_not, value, before)):
            raise TypeError(
                f"revify: {type(model).__name__}.{method} changes a list it is given (appends "
                "to it, say), which a converted copy would not do to the caller's list "
                "(NOTE [ Optional inputs ]); call it with that argument at its default"
            )
    for node in graph.nodes:
        if node.op == "get_attr" and not node.target.startswith(_PREFIX):
            node.target = _PREFIX + _keep_constant(model, getattr(entry, node.target))
        if node.op in ("call_module", "get_attr"):
            node.target = node.target.removeprefix(_PREFIX)
        if node.op == "call_module":
            node.meta["is_identity"] = type(model.get_submodule(node.target)) is nn.Identity
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k.removeprefix(_PREFIX): (path.removeprefix(_PREFIX), cls)
                for k, (path, cls) in stack.items()
                if path != "root"
            }
    return graph


def _entry(model: nn.Module, method: str, inputs: tuple[list[str], dict[str, Any]] | None,
           built: list[Any]) -> nn.Module:
    """A module whose ``forward`` takes the flat inputs (one per tensor of :func:`bind_inputs`'s
    forms) and calls ``model.<method>`` with them: what :func:`trace_method` traces, and what
    :func:`method_entry` calls eagerly."""
    names, forms = inputs if inputs is not None else (required_args(model, method), {})
    params = inspect.signature(getattr(type(model), method)).parameters
    placeholders, call = [], []
    fixed = {name: f.value for name, f in forms.items() if isinstance(f, Constant)}
    for name in names:
        form = forms.get(name)
        if form is None or form == _TENSOR:
            placeholders.append(name)
            expr = name
        else:
            kind, n = form
            items = [f"{name}_{i}" for i in range(n)]
            placeholders += items
            expr = f"_keep([{', '.join(items)}{',' if kind == 'tuple' and n == 1 else ''}])"
            expr = f"{kind}({expr})" if kind == "tuple" else expr
        positional = params[name].kind == params[name].POSITIONAL_ONLY
        call.append(expr if positional else f"{name}={expr}")
    call += [f"{name}=_fixed[{name!r}]" for name in fixed]
    src = (
        f"def forward(self, {', '.join(placeholders)}):\n"
        f"    return type(self.root).{method}(self.root, {', '.join(call)})\n"
    )
    ns: dict[str, Any] = {"_keep": lambda v: built.append((v, list(v))) or v, "_fixed": fixed}
    exec(src, ns)  # noqa: S102 - a two-line wrapper with a fixed shape
    entry = type("_Entry", (nn.Module,), {"forward": ns["forward"]})()
    entry.root = model
    return entry


def method_entry(model: nn.Module, method: str,
                 inputs: tuple[list[str], dict[str, Any]] | None) -> nn.Module:
    """A module that calls ``model.<method>`` eagerly with the flat inputs a traced graph
    takes."""
    return _entry(model, method, inputs, [])


def _trace_entry(entry: nn.Module, model: nn.Module, leaves: Iterable[nn.Module],
                 proxy_buffers: bool) -> fx.Graph:
    # Tracing runs Python code on real buffers (timm's BatchNormAct2d increments
    # num_batches_tracked in its own forward): put every buffer back afterwards.
    with buffers_kept(model):
        return _Tracer(leaves, proxy_buffers).trace(entry)


@contextlib.contextmanager
def training_kept(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` has after the body the training flag it had before."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Every buffer of ``model`` holds after the body what it held before (copied back)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


# NOTE [ Meta constants ]
# torch.fx reads a buffer as its value, not as a node: ``self.relative_position_index.view(-1)``
# in Swin, BEiT and EVA's rotary embeddings runs at trace time, and the traced graph holds the
# result as a constant (``_keep_constant``). On a model built on the meta device that constant
# is a placeholder without data; after ``to_empty()`` and timm's
# ``reinit_non_persistent_buffers`` the buffer holds the right values but a copy taken at trace
# time would hold garbage. So where a traced constant is meta, the trunk is traced again with
# buffers recorded as get_attr nodes (``proxy_buffer_attributes``): the converted code then
# derives those values from the buffers at every call. A meta constant that is still left
# (computed from no buffer) has no value to recover later: conversion is refused. Models on
# real devices keep the constants, as traced (the graph patterns the pass was built on).


def _meta_constants(entry: nn.Module, graph: fx.Graph) -> list[torch.Tensor]:
    """Trace-time tensor constants of ``graph`` (not the model's own tensors) on meta."""
    out = []
    for node in graph.nodes:
        if node.op == "get_attr" and not node.target.startswith(_PREFIX):
            value = getattr(entry, node.target)
            if isinstance(value, torch.Tensor) and value.is_meta:
                out.append(value)
    return out


def _keep_constant(model: nn.Module, value: Any) -> str:
    """Register a tensor constant created by tracing (``torch.tensor(...)`` in a forward) as a
    non-persistent buffer of ``model``, named by content so retracing reuses it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"revify: traced constant of type {type(value).__name__} is not supported")
    # Flattened first: a 0-dim tensor (``torch.tensor(0.5)``) cannot be viewed as bytes.
    data = value.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha1(
        repr((value.dtype, tuple(value.shape))).encode()
        + data.view(torch.uint8).numpy().tobytes()
    ).hexdigest()[:16]
    name = f"_revify_constant_{digest}"
    if name not in dict(model.named_buffers(recurse=False)):
        model.register_buffer(name, value.detach().clone(), persistent=False)
    return name


def module_path(node: fx.Node) -> list[str]:
    """Module paths enclosing ``node`` from outermost to innermost (leaf module included)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def module_calls(node: fx.Node) -> list[str]:
    """Like :func:`module_path`, but one name per *call*: a module called a second time in the
    traced code is ``"body@1"`` there, so two calls of one module can be told apart."""
    return list((node.meta.get("nn_module_stack") or {}).keys())


# NOTE [ In-place writes ]
# torch.fx records ``h += f(h)`` as an out-of-place add and cannot see into leaf modules
# (``nn.ReLU(inplace=True)``, a block run eagerly), yet a value written in place breaks
# reversible stages (the unit's input is a stream state) and checkpointed segments (the saved
# input would be written again by the recompute). Shape propagation runs every node on fake
# tensors, whose version counters do count in-place writes, and views share their base's
# counter: so for each node it records which of its inputs it wrote (``meta["writes"]``, names)
# and the input whose memory its result shares, if any (``meta["view_of"]``: a view, or the
# input itself returned by a block that wrote it). ``_inplace.py`` uses both.


class _ShapeProp(ShapeProp):
    """``ShapeProp`` that also records in-place writes and aliases (NOTE [ In-place writes ])."""

    def run_node(self, n: fx.Node) -> Any:
        ins = [(a, self.env[a]) for a in n.all_input_nodes
               if isinstance(self.env.get(a), torch.Tensor)]
        before = [t._version for _, t in ins]
        result = super().run_node(n)
        n.meta["writes"] = [a.name for (a, t), v in zip(ins, before, strict=True)
                            if t._version != v]
        n.meta.pop("view_of", None)
        if isinstance(result, torch.Tensor):
            base = _base(result)
            for a, t in ins:
                if _base(t) is base:
                    n.meta["view_of"] = a.name
                    break
        return result


def _base(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def propagate_shapes(model: nn.Module, graph: fx.Graph, example_inputs: Sequence[Any]) -> None:
    """Annotate ``node.meta['tensor_meta']`` by running the graph on fake tensors, in eval mode,
    and record in-place writes (NOTE [ In-place writes ]).

    Eval mode and fake tensors: no activation is allocated and no BatchNorm statistic, RNG
    stream or other state of the model changes.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm = fx.GraphModule(model, graph)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in example_inputs]
    with training_kept(model):
        model.eval()
        gm.eval()
        with torch.no_grad():
            if _fsdp.converting():
                # FSDP modules refuse the deepcopy to fake tensors ShapeProp makes; their
                # (unsharded) parameters are read as fake ones on the fly instead
                prop = _ShapeProp(gm)  # made outside the fake mode, which it would copy to
                with fake_mode:
                    prop.propagate(*fake)
            else:
                _ShapeProp(gm, fake_mode=fake_mode).propagate(*fake)


def tensor_shape(node: Any) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def extract(
    nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]
) -> fx.Graph:
    """A new graph computing ``outputs`` from ``inputs`` with copies of ``nodes`` (in order).

    One output is returned bare, several as a tuple.
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = g.placeholder(f"in_{i}_{n.name}")
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    res = [env[o] for o in outputs]
    g.output(res[0] if len(res) == 1 else tuple(res))
    return g


class GraphCode:
    """Python source generated from an fx graph, run as ``code(root, *inputs)``.

    Unlike an ``fx.GraphModule`` it registers no submodule (so ``state_dict`` keys stay as
    they were) and it pickles: modules in the code's globals are stored by name. Where no hook
    or compilation stands in the way, its module calls are direct ``forward`` calls (NOTE
    [ Direct calls ] in _direct.py).
    """

    def __init__(self, graph: fx.Graph, root: nn.Module | None = None,
                 programs: dict[str, Any] | None = None) -> None:
        code = graph.python_code(root_module="self")
        self.src = code.src
        self.globals = dict(code.globals)
        # ``root``: the module the code will run on, to find its BatchNorms; ``programs``: the
        # UnitPrograms of modules it calls, by path (_direct.py)
        direct, paths, functions, used = _direct.direct_graph(graph, root, programs)
        self.direct_src = self.direct_globals = None
        if paths:
            direct_code = direct.python_code(root_module="self")
            self.direct_src, self.direct_globals = direct_code.src, dict(direct_code.globals)
        self.callees = _direct.Callees(paths, functions, used)
        self._fn = self._direct = None

    def _compile(self) -> None:
        scope = dict(self.globals)
        exec(compile(self.src, "<revify-generated>", "exec"), scope)  # noqa: S102
        self._fn = scope["forward"]
        if self.direct_src is not None:
            scope = dict(self.direct_globals)
            exec(compile(self.direct_src, "<revify-generated>", "exec"), scope)  # noqa: S102
            self._direct = scope["forward"]

    def ready(self) -> None:
        """Generate the code now (dynamo cannot trace ``compile``: revify.compile_units)."""
        if self._fn is None:
            self._compile()

    def __call__(self, root: nn.Module, *args: Any) -> Any:
        if self._fn is None:
            self._compile()
        if self._direct is not None:
            callees = self.callees.of(root)
            if callees is not None:
                return self._direct(root, *callees, *args)
        return self._fn(root, *args)

    def direct(self, root: nn.Module) -> tuple[Any, list[Any] | None, list[nn.Module]]:
        """For running on ``root`` with direct module calls: the function, what to pass it
        before the inputs (None: the calls cannot be direct) and the modules whose calls
        ``_direct.plain_calls`` must allow at each call."""
        if self._fn is None:
            self._compile()
        if self._direct is None:  # no module calls: the code itself
            return self._fn, [], [root]
        passed, checked = self.callees.found(root)
        return self._direct, passed, checked

    def __getstate__(self) -> dict[str, Any]:
        return {"src": self.src, "globals": _by_name(self.globals),
                "direct_src": self.direct_src,
                "direct_globals": _by_name(self.direct_globals or {}),
                "callees": self.callees}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.src = state["src"]
        self.globals = _from_names(state["globals"])
        # pickled before direct calls: the ordinary code only
        self.direct_src = state.get("direct_src")
        self.direct_globals = _from_names(state.get("direct_globals") or {})
        self.callees = state.get("callees") or _direct.Callees([])
        self._fn = self._direct = None


def _by_name(globs: dict[str, Any]) -> dict[str, Any]:
    """Generated code's globals with Python modules replaced by their names (for pickling)."""
    return {k: ("__module__", v.__name__) if inspect.ismodule(v) else v for k, v in globs.items()}


def _from_names(globs: dict[str, Any]) -> dict[str, Any]:
    return {
        k: importlib.import_module(v[1])
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "__module__"
        else v
        for k, v in globs.items()
    }
