"""Layer stacks: reversible stages for models whose trunk torch.fx cannot trace (Hugging Face).

A ``transformers`` model runs its blocks in a Python loop over a ``ModuleList`` (or calls an
``nn.Sequential``)::

    hidden_states = self.embeddings(pixel_values)
    mask = create_bidirectional_mask(...)           # Python control flow on tensors: no fx trace
    for layer in self.layers:
        hidden_states = layer(hidden_states, mask, **kwargs)

The trunk does not trace, but each layer does, with its call's other arguments (attention mask,
rotary position embeddings, flags) as *side inputs*. See NOTE [ Layer stacks ].
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import _fsdp, _mode
from . import _record as _checkpoint_record
from ._match import find_residuals
from ._plan import ConversionError, _is_layout
from ._trace import _Tracer, buffers_kept, propagate_shapes, tensor_shape, training_kept
from .coupling import ReversibleStage, _ModuleUnit

__all__: list[str] = []

_STACKS = "_revify_stacks"

# NOTE [ Layer stacks ]
# convert runs the model once on the example input (eval mode, no state kept) with hooks on
# the children of every ModuleList / Sequential, and records each call: the hidden states
# (first argument), the other arguments and the output. A run of consecutive children becomes
# a reversible stage when each child
#   - is called once, on the tensor the previous one returned, with the *same* other
#     arguments (the same tensor objects: a loop-invariant mask or (cos, sin) pair),
#   - returns a tensor of its input's shape and dtype, and
#   - traces with torch.fx (modules that do not, such as attention with its Python dispatch,
#     stay leaves) into a residual body h -> h + R(h, side), its branches reading h and side
#     inputs only (``_match.find_residuals`` with ``side``); a post-norm add (BERT's
#     LayerNorm(h + F(h))) is the black box U(h) - h as for ResNet v1.
# At run time the loop still calls every layer. The first layer's call runs the whole stage on
# its input, passing its other arguments to every unit (forward and backward recompute: the
# walk keeps them, ``ReversibleStage.__call__(x, side)``), and returns a *pending* marker
# instead of a tensor; each following layer checks it is given that marker, in order, with the
# same other arguments, and the last returns the stage output. The marker is not a tensor:
# code that reads an intermediate hidden state (a loop that stops early) raises instead of
# computing with a wrong value. Where transformers' output capture records the hidden states
# (output_hidden_states=True), the stage runs with every state tapped (NOTE [ Taps ] in
# coupling.py) and each layer returns its state instead of the marker; the next layer must be
# given that tensor back, unchanged (its version counter), or it raises. Inputs the stage cannot
# replay raise a clear error: a KV cache (written by every call, so the recompute would write it
# again), side inputs that require grad, output_attentions, HF gradient checkpointing. Nothing
# else between layers is checkpointed (embeddings, final norm, head).

# The layer whose original forward runs now (a unit call inside its stage).
_INSIDE: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar(
    "revify_stack_inside", default=None
)


def is_transformers_module(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` module (a model or a part of one)."""
    return type(model).__module__.startswith("transformers.")


def refuse_stacks(api: str, model: nn.Module) -> None:
    """Hugging Face models run layer stacks, not a plan: the audit and check do not see them."""
    if is_transformers_module(model) or stacks_of(model):
        raise TypeError(
            f"{api}: {type(model).__name__} is a Hugging Face model converted by layer stacks "
            "(NOTE [ Layer stacks ] in revify/_stacks.py), which this does not support yet; "
            "compare gradients with revify.plain_autograd() instead"
        )


def _is_cache(value: Any) -> bool:
    utils = sys.modules.get("transformers.cache_utils")
    cache = getattr(utils, "Cache", None)
    return cache is not None and isinstance(value, cache)


def default_inputs(model: nn.Module) -> dict[str, Any]:
    """Keyword inputs of a batch of 2 for a ``transformers`` model, from its config: zeros
    ``pixel_values`` of ``config.image_size`` for vision models, 16 token ids for text models."""
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    if config is not None and name == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(config, "num_channels", 3)
        return {name: torch.zeros(2, channels, *size, device=device, dtype=dtype)}
    if config is not None and name == "input_ids":
        length = min(16, getattr(config, "max_position_embeddings", 16) or 16)
        return {name: torch.zeros(2, length, dtype=torch.long, device=device)}
    raise _error(
        f"revify.convert: no default example input for {type(model).__name__}; pass "
        "example_input=dict(<input name>=tensor), e.g. dict(pixel_values=x) or "
        "dict(input_ids=ids)"
    )


def _error(msg: str) -> Exception:
    return ConversionError(msg)


# ----------------------------------------------------------------------------------------------
# Recording the layer calls


@dataclass(eq=False)
class _Call:
    container: str  # path of the ModuleList / Sequential
    index: int
    path: str
    layer: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None
    writes: bool = False  # its forward writes its hidden states in place (run on a copy)

    @property
    def hidden_out(self) -> Any:
        """The hidden states it returned: the output, or the first of ``(h, None, ...)``."""
        return _unwrap(self.output)[0]


def _unwrap(out: Any) -> tuple[Any, int]:
    """``(hidden states, tuple length)`` of a layer output: a tensor (length 0), or a tuple
    whose other items are None (``(h,)`` of Swin and transformers 4, no attentions asked)."""
    if isinstance(out, tuple) and out and all(o is None for o in out[1:]):
        return out[0], len(out)
    return out, 0


def _wrap(h: Any, length: int) -> Any:
    return h if length == 0 else (h, *([None] * (length - 1)))


def _containers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (p, m) for p, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0
    ]


def _record(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[_Call]:
    """Every call of a container's child during one eager run of ``model`` (eval mode, grad
    enabled so that side inputs derived from parameters show it; buffers put back after)."""
    calls: list[_Call] = []
    open_calls: dict[int, list[_Call]] = {}
    handles = []
    for cpath, container in _containers(model):
        for i, child in enumerate(container):
            path = f"{cpath}.{i}" if cpath else str(i)

            def pre(m, a, k, cpath=cpath, i=i, path=path):
                call = _Call(cpath, i, path, m, a, dict(k))
                calls.append(call)
                open_calls.setdefault(id(m), []).append(call)

            def post(m, a, k, out):
                open_calls[id(m)].pop().output = out

            handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(child.register_forward_hook(post, with_kwargs=True))
    try:
        with training_kept(model), buffers_kept(model), torch.enable_grad():
            model.eval()
            model(*args, **kwargs)
    except Exception as e:
        raise _error(
            f"revify.convert: running {type(model).__name__} on the example input failed "
            f"({type(e).__name__}: {e}); pass example_input= (a dict of keyword inputs, e.g. "
            "dict(input_ids=ids)) that the model accepts"
        ) from e
    finally:
        for h in handles:
            h.remove()
    return calls


def _hidden(call: _Call) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``(hidden_states, other positional args, other keyword args)`` of a call."""
    if call.args:
        return call.args[0], call.args[1:], call.kwargs
    params = list(inspect.signature(type(call.layer).forward).parameters)
    first = params[1] if len(params) > 1 else None
    kwargs = dict(call.kwargs)
    return kwargs.pop(first, None), (), kwargs


def _flat(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _flat(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    else:
        yield value


def _same(a: Any, b: Any) -> bool:
    """Whether two side arguments are the same: the same tensor objects, equal other values."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# Is a layer a residual unit?


class _BackoffTracer(_Tracer):
    """``_Tracer`` that keeps a module it cannot trace through as a leaf (HF attention, whose
    Python dispatch on shapes fails under fx), so that the layer's own adds stay visible."""

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, forward, args, kwargs)
        last = next(iter(reversed(self.graph.nodes)))
        stack = self.module_stack.copy()
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            for n in reversed(list(self.graph.nodes)):
                if n is last:
                    break
                self.graph.erase_node(n)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self._leaf_ids.add(id(m))
            return super().call_module(m, forward, args, kwargs)


def _side_template(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, list[Tensor]]:
    """The side arguments with each tensor replaced by its index in the returned list."""
    tensors: list[Tensor] = []

    def walk(v: Any) -> Any:
        if isinstance(v, Tensor):
            tensors.append(v)
            return _Slot(len(tensors) - 1)
        if isinstance(v, (tuple, list)):
            return type(v)(walk(x) for x in v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk((args, kwargs)), tensors


@dataclass(frozen=True)
class _Slot:
    index: int


def _put(template: Any, values: tuple[Any, ...]) -> Any:
    if isinstance(template, _Slot):
        return values[template.index]
    if isinstance(template, (tuple, list)):
        return type(template)(_put(t, values) for t in template)
    if isinstance(template, dict):
        return {k: _put(t, values) for k, t in template.items()}
    return template


class _Entry(nn.Module):
    """Calls ``layer.forward`` with traced tensors put into the recorded side arguments."""

    def __init__(self, layer: nn.Module, template: Any, wrap: int) -> None:
        super().__init__()
        self.layer = layer
        self.template = template
        self.wrap = wrap

    def call(self, h: Any, *tensors: Any) -> Any:
        args, kwargs = _put(self.template, tensors)
        out = type(self.layer).forward(self.layer, h, *args, **kwargs)
        return out[0] if self.wrap else out  # the hidden states (``_unwrap``)


def _entry(layer: nn.Module, template: Any, n: int, wrap: int) -> nn.Module:
    names = ", ".join(["h", *(f"s{i}" for i in range(n))])
    ns: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.call({names})\n", ns)  # noqa: S102
    cls = type("_StackEntry", (_Entry,), {"forward": ns["forward"]})
    return cls(layer, template, wrap)


def _residual_problem(call: _Call) -> tuple[str | None, bool]:
    """Why the layer of ``call`` is not a residual unit ``h -> h + R(h, side)`` (None if it is),
    and whether it writes its input in place (it then runs on a copy)."""
    h, args, kwargs = _hidden(call)
    template, tensors = _side_template(args, kwargs)
    entry = _entry(call.layer, template, len(tensors), _unwrap(call.output)[1])
    saved = [(b, b.detach().clone()) for b in call.layer.buffers()]
    try:
        graph = _BackoffTracer().trace(entry)
        propagate_shapes(entry, graph, (h.detach(), *(t.detach() for t in tensors)))
    except Exception as e:
        return f"its forward cannot be traced to check it is residual ({type(e).__name__})", False
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    for n in graph.nodes:  # as trace_method marks them: nn.Identity shortcuts are skip paths
        if n.op == "call_module":
            n.meta["is_identity"] = type(entry.get_submodule(n.target)) is nn.Identity
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    hp, side = placeholders[0], frozenset(placeholders[1:])
    identity = [r for r in find_residuals(graph, side) if r.kind == "identity"]
    scope = {n for n in graph.nodes if n.op not in ("placeholder", "output")}
    inside = [q for q in identity if q.members <= scope]
    nested = {n for q in inside for n in q.region}
    top = [q for q in inside if q.add not in nested]
    if not top:
        return "no identity residual add h + F(h) found in its forward", False
    covered = set().union(*(q.members for q in top))
    other = [n for n in scope - covered if not _is_layout(n)]
    if other:
        return f"it computes more than its residuals ({other[0].name})", False
    entries = {
        a for n in scope for a in n.all_input_nodes if a not in scope and a.op != "get_attr"
    } - side
    exits = [n for n in scope if any(u not in scope for u in n.users)]
    if entries != {hp} or len(exits) != 1 or tensor_shape(exits[0]) != tensor_shape(hp):
        return "its forward is not one same-shape map of residual units", False
    # NOTE [ In-place writes ] in _trace.py: follow views back to h.
    by_name = {n.name: n for n in graph.nodes}

    def base(name: str) -> str:
        seen = set()
        while name in by_name and "view_of" in by_name[name].meta and name not in seen:
            seen.add(name)
            name = by_name[name].meta["view_of"]
        return name

    writes = any(base(w) == hp.name for n in scope for w in n.meta.get("writes", ()))
    return None, writes


# ----------------------------------------------------------------------------------------------
# Running a stack


class _LayerUnit(_ModuleUnit):
    """One layer of a stack: ``U(h) = layer(h, *side_args, **side_kwargs)``, ``R = U - id``.

    ``side`` is the call's other arguments, given per stage call (the walk keeps them for the
    backward): the mask and position embeddings the loop passes to every layer."""

    wrap = 0  # the layer returns a tuple of this length, hidden states first (``_unwrap``)

    def raw(self, h: Tensor, side: Any = None) -> Tensor:
        with _Inside(self.module):
            return self.plain(h, side)

    def inside(self) -> _Inside:
        """The context :meth:`plain` runs in: the layer's stack forward then runs the layer."""
        return _Inside(self.module)

    def plain(self, h: Tensor, side: Any = None) -> Tensor:
        """:meth:`raw` without entering :meth:`inside` (revify.compile_units enters it outside
        the compiled code: dynamo cannot set a context variable)."""
        h = h.clone() if self.copy_input else h
        args, kwargs = side if side is not None else ((), {})
        out = self.module(h, *args, **kwargs)
        u, length = _unwrap(out)
        if length != self.wrap or not isinstance(u, Tensor):
            raise RuntimeError(
                f"revify: {self.name} returned {type(out).__name__} (length "
                f"{len(out) if isinstance(out, tuple) else '-'}) where it returned its hidden "
                "states alone at convert time: a reversible stage hands on hidden states only "
                "(output_attentions?); call it as at convert time, or revify.revert(model)"
            )
        return u


class _Inside:
    """While entered, ``layer``'s stack forward runs the layer itself (``_INSIDE``)."""

    __slots__ = ("layer", "token")

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __enter__(self) -> None:
        self.token = _INSIDE.set(self.layer)

    def __exit__(self, *exc: Any) -> None:
        _INSIDE.reset(self.token)


class _Pending:
    """What a stack's layers but the last return: the stage has run, its output is handed on
    by the last layer. Not a tensor, so that code reading an intermediate hidden state raises
    instead of computing with the wrong value (NOTE [ Layer stacks ])."""

    def __init__(self, stack: _Stack, out: Tensor, side: Any) -> None:
        self.stack, self.out, self.side, self.next = stack, out, side, 1
        # with output_hidden_states: the states the layers hand out instead of the marker
        self.states: list[Tensor | None] | None = None
        self.versions: list[int] = []

    def _refuse(self) -> RuntimeError:
        s = self.stack
        return RuntimeError(
            f"revify: the hidden states after {s.paths[self.next - 1]} are not materialised: "
            f"{s.paths[0]}..{s.paths[-1]} run as one reversible stage, which only returns the "
            f"output of {s.paths[-1]}; call every layer of it in order, or revify.revert(model)"
        )

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        pending = next(a for a in _flat((args, kwargs or {})) if isinstance(a, _Pending))
        raise pending._refuse()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("stack", "out", "side", "next", "states",
                                             "versions"):
            raise AttributeError(name)
        raise self._refuse()

    def __repr__(self) -> str:
        return f"<revify pending stage output after {self.stack.paths[self.next - 1]}>"


class _Stack:
    """A run of consecutive layers of one container, run as one :class:`ReversibleStage`."""

    def __init__(self, stage: ReversibleStage, layers: list[nn.Module], paths: list[str]) -> None:
        self.stage, self.layers, self.paths = stage, layers, paths
        self.wraps = [u.wrap for u in stage.units]
        self.pending: _Pending | None = None

    def check_first(self, layer: nn.Module, side: Any) -> bool:
        """Refuse a call whose inputs the stage cannot replay (NOTE [ Layer stacks ]); True
        when the hidden states are captured (``output_hidden_states``): the layers then hand
        out the stage's states (NOTE [ Taps ] in coupling.py)."""
        name = f"revify: {self.paths[0]} ({type(layer).__name__})"
        sharded = [p for p, m in zip(self.paths, self.layers, strict=True)
                   if _fsdp.sharded_modules(m)]
        if sharded:  # NOTE [ FSDP2 ]: layer stacks do not drive FSDP states (not tested)
            raise RuntimeError(
                f"revify: {', '.join(sharded[:4])} of the reversible stage {self.paths[0]}.."
                f"{self.paths[-1]} {'is' if len(sharded) == 1 else 'are'} sharded by FSDP "
                "(fully_shard) on their own, which Hugging Face layer stacks do not support "
                "yet; fully_shard the converted model as a whole (docs/distributed.md)"
            )
        values = list(_flat(side))
        if any(_is_cache(v) for v in values):
            raise RuntimeError(
                f"{name} was called with a KV cache (use_cache=True): a reversible stage runs "
                "each layer again in backward, which would write the cache twice. Call the "
                "model with use_cache=False (or set model.config.use_cache = False) to train, "
                "and revify.revert(model) to generate"
            )
        if torch.is_grad_enabled() and any(
            isinstance(v, Tensor) and v.requires_grad for v in values
        ):
            raise RuntimeError(
                f"{name} was called with a side input that requires grad (besides its hidden "
                "states); a reversible stage does not differentiate side inputs. Detach it, "
                "or revify.revert(model)"
            )
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            raise RuntimeError(
                f"{name} has Hugging Face gradient checkpointing enabled; revify already "
                "recomputes the layer: call model.gradient_checkpointing_disable()"
            )
        capturing = sys.modules.get("transformers.utils.output_capturing")
        collector = getattr(capturing, "_active_collector", None)
        captured = collector.get() if collector is not None else None
        if captured and set(captured) - {"hidden_states", "_hidden_states_layers"}:
            raise RuntimeError(
                f"{name}: output_attentions (or another output captured inside the layers) is "
                "not supported by a reversible stage, which runs each layer's internals again "
                "in backward; call without it, or revify.revert(model)"
            )
        return bool(captured)

    def call(self, k: int, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> Any:
        h, side = args[0], (args[1:], kwargs)
        n = len(self.layers)
        if k == 0:
            handed = self.check_first(layer, side)
            # A marker left by a forward that stopped early (it raised when read) is dropped.
            if n == 1:
                return self.stage(h, side)
            if handed:  # each layer returns its state, read by the hidden-state capture
                # the capture hooks record the loop's calls, not the stage's own unit calls
                collector = sys.modules["transformers.utils.output_capturing"]._active_collector
                token = collector.set(None)
                try:
                    out, *states = self.stage(h, side, taps=range(1, n))
                finally:
                    collector.reset(token)
                self.pending = p = _Pending(self, out, side)
                p.states, p.versions = states, [t._version for t in states]
                return states[0]
            self.pending = _Pending(self, self.stage(h, side), side)
            return self.pending
        p = self.pending
        if p is not None and p.states is not None and p.next == k:
            # a handed-out state: the next layer must get it back, unchanged
            given, p.states[k - 1] = p.states[k - 1], None
            if h is given and h._version == p.versions[k - 1]:
                h = p
        if not isinstance(h, _Pending) or h is not p or p.next != k:
            raise RuntimeError(
                f"revify: {self.paths[k]} was called out of order: it is unit {k} of the "
                f"reversible stage {self.paths[0]}..{self.paths[-1]}, which runs when "
                f"{self.paths[0]} is called; call its layers in order on what the previous "
                "one returned, or revify.revert(model)"
            )
        if not _same(side, p.side):
            raise RuntimeError(
                f"revify: {self.paths[k]} was called with other arguments than "
                f"{self.paths[0]}; the stage {self.paths[0]}..{self.paths[-1]} ran every layer "
                "with the first layer's. Call the layers with the same mask and position "
                "inputs, or revify.revert(model)"
            )
        p.next += 1
        if k == n - 1:
            self.pending, out = None, p.out
            p.out = None
            return out
        return p if p.states is None else p.states[k]


class _StackForward:
    """``forward`` of a stack's layer (installed on the instance)."""

    def __init__(self, stack: _Stack, k: int) -> None:
        self.stack, self.k = stack, k

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.stack.layers[self.k]
        if _mode.is_original() or _INSIDE.get() is layer:
            return type(layer).forward(layer, *args, **kwargs)
        if not args:  # hidden states given by keyword
            first = list(inspect.signature(type(layer).forward).parameters)[1]
            args, kwargs = (kwargs.pop(first),), kwargs
        return _wrap(self.stack.call(self.k, layer, args, kwargs), self.stack.wraps[self.k])


# ----------------------------------------------------------------------------------------------
# Planning


def _unit_problem(call: _Call, count: dict[int, int]) -> str | None:
    """Why a recorded call cannot be a unit (None if it can, before the residual check)."""
    if count[id(call.layer)] != 1:
        return f"called {count[id(call.layer)]} times per forward"
    h, args, kwargs = _hidden(call)
    out = call.hidden_out
    if not isinstance(h, Tensor) or not h.is_floating_point():
        return "its first argument is not floating-point hidden states"
    if isinstance(call.output, tuple) and not isinstance(out, Tensor):
        return ("it returns a tuple of more than its hidden states (attention weights: "
                "eager attention or output_attentions?)")
    if not isinstance(out, Tensor):
        return f"it returns {type(out).__name__}, not a tensor"
    if out.shape != h.shape or out.dtype != h.dtype:
        return f"it maps {tuple(h.shape)} to {tuple(out.shape)}"
    if not any(True for _ in call.layer.parameters()):
        return "it has no parameters"
    return None


def _refusal(call: _Call) -> str | None:
    """A side input that cannot be replayed, as a ConversionError message (None if fine)."""
    _, args, kwargs = _hidden(call)
    values = list(_flat((args, kwargs)))
    name = f"revify.convert: {call.path} ({type(call.layer).__name__})"
    if any(_is_cache(v) for v in values):
        return (
            f"{name} is called with a KV cache (use_cache=True), which every call writes: a "
            "reversible stage runs each layer again in backward and would write it twice. Set "
            "model.config.use_cache = False before convert (training does not use the cache), "
            "or pass example_input=dict(..., use_cache=False)"
        )
    grads = [v for v in values if isinstance(v, Tensor) and v.requires_grad]
    if grads:
        return (
            f"{name} reads a side input that requires grad besides its hidden states (e.g. "
            f"encoder_hidden_states of cross-attention, shape {tuple(grads[0].shape)}); a "
            "reversible stage does not differentiate side inputs: not supported"
        )
    return None


def plan_stacks(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
) -> tuple[list[_Stack], list[str]]:
    """The stacks of ``model`` (innermost containers first) and why other layers are not."""
    calls = _record(model, args, kwargs)
    count: dict[int, int] = {}
    for c in calls:
        count[id(c.layer)] = count.get(id(c.layer), 0) + 1
    skipped: list[str] = []
    taken: list[str] = []  # paths of layers made units
    stacks: list[_Stack] = []
    by_container: dict[str, list[_Call]] = {}
    for c in calls:
        by_container.setdefault(c.container, []).append(c)
    depth = {p: p.count(".") + (p != "") for p in by_container}
    for cpath in sorted(by_container, key=lambda p: -depth[p]):
        run: list[_Call] = []
        for c in [*by_container[cpath], None]:
            ok = c is not None and not any(
                c.path.startswith(t + ".") or t.startswith(c.path + ".") for t in taken
            )
            why = _unit_problem(c, count) if ok else None
            if ok and why is None:
                refusal = _refusal(c)
                if refusal:
                    raise _error(refusal)
                why, c.writes = _residual_problem(c)
            ok = ok and why is None
            if ok and run:
                prev = run[-1]
                h, a, k = _hidden(c)
                _, pa, pk = _hidden(prev)
                ok_next = (c.index == prev.index + 1 and h is prev.hidden_out
                           and _same((a, k), (pa, pk)))
                if not ok_next:
                    _flush(model, run, options, stacks, taken)
                    run = []
            if ok:
                run.append(c)
            else:
                if c is not None and why is not None:
                    skipped.append(f"{c.path}: {why}")
                _flush(model, run, options, stacks, taken)
                run = []
    return stacks, skipped


def _flush(model: nn.Module, run: list[_Call], options: dict[str, Any],
           stacks: list[_Stack], taken: list[str]) -> None:
    if len(run) < options["min_units"]:
        return
    units = []
    for c in run:
        unit = _LayerUnit(c.path, c.layer)
        unit.pattern = "Hugging Face layer (residual, side inputs)"
        unit.copy_input = c.writes
        unit.wrap = _unwrap(c.output)[1]
        units.append(unit)
    label = run[0].container or type(model).__name__
    stage = ReversibleStage(
        label, units, alpha=options["alpha"], beta=options["beta"], exact=options["exact"]
    )
    stacks.append(_Stack(stage, [c.layer for c in run], [c.path for c in run]))
    taken += [c.path for c in run]


def install(model: nn.Module, stacks: list[_Stack]) -> None:
    from ._replay import slots_of

    model.__dict__[_STACKS] = stacks
    for st in stacks:
        for k, layer in enumerate(st.layers):
            layer.__dict__["forward"] = _StackForward(st, k)
        for u in st.stage.units:
            slots_of(u)


def stacks_of(model: nn.Module) -> list[_Stack]:
    """Every installed stack of ``model`` and its submodules."""
    out: list[_Stack] = []
    for _, m in model.named_modules():
        out += m.__dict__.get(_STACKS, [])
    return out


def uninstall(model: nn.Module) -> None:
    for _, m in model.named_modules():
        if isinstance(m.__dict__.get("forward"), _StackForward):
            del m.__dict__["forward"]
        m.__dict__.pop(_STACKS, None)
        m.__dict__.pop("_revify_stack_options", None)


def convert_stacks(
    model: nn.Module, example_input: Any, options: dict[str, Any]
) -> nn.Module:
    """``convert`` for a ``transformers`` module (NOTE [ Layer stacks ])."""
    if example_input is None:
        args, kwargs = (), default_inputs(model)
    elif isinstance(example_input, dict):
        args, kwargs = (), dict(example_input)
    elif isinstance(example_input, (tuple, list)):
        args, kwargs = tuple(example_input), {}
    else:
        args, kwargs = (example_input,), {}
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise _error(
            f"revify.convert: {type(model).__name__} has Hugging Face gradient checkpointing "
            "enabled; call model.gradient_checkpointing_disable() first (revify recomputes "
            "the layers itself)"
        )
    stacks, skipped = plan_stacks(model, args, kwargs, options)
    if not stacks:
        why = "; ".join(list(dict.fromkeys(skipped))[:8])
        why = why or "no ModuleList or Sequential of layers is called"
        raise _error(
            f"revify.convert: no stack of residual layers found in {type(model).__name__} "
            f"({why})"
        )
    install(model, stacks)
    model.__dict__["_revify_stack_options"] = dict(options)
    _checkpoint_record.install(model)  # NOTE [ Checkpoint record ]
    return model

