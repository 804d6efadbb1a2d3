"""Run traced code with its module calls made directly: ``m.forward(x)`` instead of ``m(x)``.

Every unit runs twice per step (forward and recompute), and at batch 64 on a GPU the step is
host-bound, so the Python of each module call is step time (issue 14). See NOTE [ Direct calls ].
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _module

from . import _replay

__all__: list[str] = []

# NOTE [ Direct calls ]
# ``m(x)`` runs nn.Module.__call__ before ``m.forward(x)``: about 50 bytecodes (the compiled-
# module branch, the tracing state, eight hook dictionaries), plus ~23 for the ``self.conv1``
# lookup through nn.Module.__getattr__. A ResNet bottleneck makes 13 such calls; its forward and
# its recompute cost ResNet-50 ~25k bytecodes a step, 1.6 ms of modelled H100 host time (the
# shared GPU time model, bf16, batch 64). Code that revify generates from a traced graph
# therefore calls the modules' ``forward`` directly, the modules passed in as arguments and
# found once by path, when, and only when, ``__call__`` would do nothing else:
#   - no forward or backward (pre-)hook on any module called, and no global module hook (FSDP2,
#     hook-based profilers and wrappers register hooks: they then run as they always did);
#   - none compiled with ``Module.compile()`` and none of a class that overrides ``__call__``;
#   - not under ``torch.jit.trace`` (which calls ``_slow_forward``) or torch.compile (which
#     traces either way);
# and these are checked at every call, in C-level iterations (a dozen bytecodes a unit). The
# modules are found again by path whenever a module, parameter or buffer was registered
# anywhere (NOTE [ Slot cache ] in _replay.py), so one replaced after conversion is called, as
# the traced code's attribute lookups would call it.
#
# A whole-module unit (a timm Bottleneck), a compound module a segment calls (a transition
# block) and, inside those, each submodule that has submodules, are traced on their own for this
# (UnitProgram), one level deep: the module's own forward becomes generated code, and every
# submodule it calls runs its own forward (or its own program). That trace freezes what the
# trunk's trace freezes (Python branches on attributes, which submodules are None), so it is
# made only where conversion can check it (_plan._unit_program): the same value as the eager
# forward on a random input, the same code in train and eval mode, no tensor constant kept, and
# a forward that sets none of the module's own attributes or buffers (a trace would do that
# once, at tracing). At every call the program also needs the module's class, its forward and
# every submodule slot (class, or None) as traced: else the module is called, as before. torch.nn
# BatchNorm, Conv2d and Linear are called by functions of ours (NOTE [ Direct BatchNorm ]).
# Measured (the shared tool, bf16, batch 64): ResNet-50 168.7k -> 115.0k bytecodes a step,
# 48.0 -> 44.5 ms; ResNet-152 139.0 -> 128.4 ms.

_HOOK_STATE = operator.attrgetter(
    "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
    "_compiled_call_impl",
)
_MODULE_CALL = nn.Module.__call__
# torch.nn's global module hooks (register_module_forward_hook, ...), read at every call
_GLOBAL_HOOKS = operator.attrgetter(
    "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
    "_global_backward_hooks",
)
_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling


def plain_calls(modules: Sequence[nn.Module]) -> bool:
    """Whether calling each of ``modules`` now would only call its ``forward`` (NOTE
    [ Direct calls ])."""
    return not (
        _is_compiling()  # first: dynamo then traces no further (revify.compile_units)
        or any(chain(_GLOBAL_HOOKS(_module), chain.from_iterable(map(_HOOK_STATE, modules))))
        or _tracing_state() is not None
    )


def _identifier(path: str) -> str:
    """``path`` as part of a Python name: module names need not be identifiers (torchvision's
    RegNet names its blocks ``block1-0``)."""
    return re.sub(r"\W", "_", path)


def direct_graph(
    graph: fx.Graph, root: nn.Module | None = None, programs: dict[str, Any] | None = None,
) -> tuple[fx.Graph, list[str], frozenset[int], list[Any]]:
    """A copy of ``graph`` whose module calls are direct, on modules passed as its first
    inputs: ``forward`` calls, a function of ours for torch.nn BatchNorms, Conv2d and Linear
    (``_FUNCTIONS``, found on ``root``), and for a module with one of ``programs`` (by path),
    that :class:`UnitProgram`, passed in after the modules. Returns the graph, the module paths
    (one per module input), the functions by position among them, and ``(path, program)`` per
    program input."""
    programs = programs or {}
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    calls = [n for n in graph.nodes if n.op == "call_module"]
    paths = list(dict.fromkeys(str(n.target) for n in calls))
    module_inputs = {p: g.placeholder(f"m{i}_{_identifier(p)}") for i, p in enumerate(paths)}
    used = [p for p in paths if p in programs]
    program_inputs = {p: g.placeholder(f"p{i}_{_identifier(p)}") for i, p in enumerate(used)}
    functions = {
        i: _FUNCTIONS[type(m)] for i, p in enumerate(paths)
        if root is not None and type(m := root.get_submodule(p)) in _FUNCTIONS
    }
    called: dict[int, Any] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            path = str(n.target)
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            m = module_inputs[path]
            one_input = len(args) == 1 and not kwargs
            i = paths.index(path)
            if i in functions and one_input:
                env[n] = g.call_function(functions[i], (m, *args))
                called[i] = functions[i]
            elif path in program_inputs and one_input:
                env[n] = g.call_method("__call__", (program_inputs[path], m, *args))
            else:
                env[n] = g.call_method("forward", (m, *args), kwargs)
            env[n].meta = dict(n.meta)
        else:
            env[n] = g.node_copy(n, env.__getitem__)
    return g, paths, called, [(p, programs[p]) for p in used]


# NOTE [ Direct BatchNorm ]
# BatchNorm is a third of a ResNet's module calls, and its Python is the longest: forward,
# F.batch_norm, _verify_batch_size and eight nn.Module.__getattr__ lookups, ~150 bytecodes a
# call (ResNet-50: ~16k a step, half of them in recomputes). batch_norm below is what
# _BatchNorm.forward and F.batch_norm do (torch 2.14) for torch.nn's own BatchNorm1d/2d/3d,
# reading the module's tables directly (~50 bytecodes). Everything unusual goes to the module's
# own forward before anything is written: an instance-level forward, a wrong input rank, tensors
# with __torch_function__ (F.batch_norm hands those on), a batch of one value per channel or an
# eps <= 0 (the errors F.batch_norm raises). tests/test_direct.py compares it with the module's
# forward, output and buffers bit for bit, over train/eval, tracked or not, momentum or
# cumulative averages, affine or not, and running statistics or none.

_BATCH_NORM_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
_has_torch_function = torch._C._has_torch_function_variadic
_cudnn_enabled = torch._C._get_cudnn_enabled


def batch_norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m.forward(x)`` for a torch.nn BatchNorm1d/2d/3d ``m`` (NOTE [ Direct BatchNorm ])."""
    d = m.__dict__
    buffers, params = d["_buffers"], d["_parameters"]
    try:  # a tensor moved out of its table (functional_call, weight surgery): as the module
        mean, var, weight, bias = (
            buffers["running_mean"], buffers["running_var"], params["weight"], params["bias"]
        )
    except KeyError:
        return m.forward(x)
    training, eps = d["training"], d["eps"]
    use_batch = training or (mean is None and var is None)
    if (
        "forward" in d
        or eps <= 0.0
        or x.ndim not in _BATCH_NORM_DIMS[type(m)]
        or _has_torch_function(x, mean, var, weight, bias)
        or use_batch and x.numel() == x.shape[1]
    ):
        return m.forward(x)
    momentum = d["momentum"]
    factor = 0.0 if momentum is None else momentum
    if training:
        if d["track_running_stats"]:
            count = buffers["num_batches_tracked"]
            if count is not None:
                count.add_(1)
                if momentum is None:  # cumulative moving average
                    factor = 1.0 / float(count)
        else:  # statistics not tracked: none updated
            mean = var = None
    return torch.batch_norm(x, weight, bias, mean, var, use_batch, factor, eps, _cudnn_enabled())


def conv2d(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m.forward(x)`` for a torch.nn Conv2d ``m``: ``F.conv2d`` (``torch.conv2d``) on its
    tables' tensors, as ``Conv2d._conv_forward`` calls it with zero padding; any other padding
    mode, an instance-level forward or a weight outside its table goes to ``m.forward``."""
    d = m.__dict__
    p = d["_parameters"]
    if "forward" in d or d["padding_mode"] != "zeros" or "weight" not in p or "bias" not in p:
        return m.forward(x)
    return torch.conv2d(x, p["weight"], p["bias"], d["stride"], d["padding"], d["dilation"],
                        d["groups"])


def linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m.forward(x)`` for a torch.nn Linear ``m``: ``F.linear`` on its tables' tensors."""
    d = m.__dict__
    p = d["_parameters"]
    if "forward" in d or "weight" not in p or "bias" not in p:
        return m.forward(x)
    return _linear(x, p["weight"], p["bias"])


_linear = torch._C._nn.linear  # F.linear itself
# the torch.nn classes whose calls are made by a function of ours (exact classes: a subclass
# may override forward)
_FUNCTIONS = {
    nn.BatchNorm1d: batch_norm, nn.BatchNorm2d: batch_norm, nn.BatchNorm3d: batch_norm,
    nn.Conv2d: conv2d, nn.Linear: linear,
}


class Callees:
    """The modules a direct graph calls, found by path from its root and kept until a module,
    parameter or buffer is registered anywhere (NOTE [ Direct calls ])."""

    __slots__ = ("paths", "functions", "programs", "called_root", "_found")

    def __init__(self, paths: Sequence[str], functions: dict[int, Any] | None = None,
                 programs: Sequence[Any] = (), called_root: bool = False) -> None:
        self.paths = list(paths)
        # positions called by a function of ours (_FUNCTIONS): their classes must still be its
        self.functions = dict(functions or {})
        self.programs = list(programs)  # (path, program), passed after the modules
        self.called_root = called_root  # the root is called too (checked, not passed)
        # (epoch, root, the modules, the modules checked at each call) when last found
        self._found: tuple[int, nn.Module, list[nn.Module] | None, list[nn.Module]] | None = None

    def of(self, root: nn.Module) -> list[nn.Module] | None:
        """The modules to call directly now, or None where ``__call__`` must be used."""
        found = self._found
        if found is None or found[0] != _replay._EPOCH[0] or found[1] is not root:
            found = self._find(root)
        modules = found[2]
        return modules if modules is not None and plain_calls(found[3]) else None

    def prime(self, root: nn.Module) -> None:
        """Find the modules on ``root`` now, and prime the programs among them."""
        self._find(root)
        for path, program in self.programs:
            program.prime(root.get_submodule(path))

    def found(self, root: nn.Module) -> tuple[list[nn.Module] | None, list[nn.Module]]:
        """The modules to pass (None: they cannot be called directly) and those to check at each
        call, found by path on ``root`` now."""
        found = self._find(root)
        return found[2], found[3]

    def _find(self, root: nn.Module) -> tuple[int, nn.Module, list[nn.Module] | None, list]:
        _replay._install_hooks()  # before caching: a hit then implies the epoch moves
        try:
            modules: list[nn.Module] | None = [root.get_submodule(p) for p in self.paths]
        except AttributeError:  # a path gone: the ordinary code raises as it would have
            modules = None
        checked = [root, *(modules or [])] if self.called_root else list(modules or [])
        if any(type(m).__call__ is not _MODULE_CALL for m in checked) or (
            modules is not None
            and any(_FUNCTIONS.get(type(modules[i])) is not f for i, f in self.functions.items())
        ):
            modules = None
        passed = None if modules is None else [*modules, *(p for _, p in self.programs)]
        self._found = (_replay._EPOCH[0], root, passed, checked)
        return self._found

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "functions": self.functions, "programs": self.programs,
                "called_root": self.called_root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.paths, self.functions = state["paths"], state.get("functions", {})
        self.programs = state.get("programs", [])
        self.called_root = state.get("called_root", False)
        self._found = None

    def __deepcopy__(self, memo: dict[int, Any]) -> Callees:
        import copy

        programs = copy.deepcopy(self.programs, memo)
        return Callees(self.paths, self.functions, programs, self.called_root)


def _structure(module: nn.Module) -> list[tuple[str, type | None]]:
    """Every submodule slot under ``module``, by path, with its class (None: an empty slot)."""
    out: list[tuple[str, type | None]] = []
    stack = [("", module)]
    while stack:
        prefix, m = stack.pop()
        for name, child in m._modules.items():
            path = prefix + name
            out.append((path, None if child is None else type(child)))
            if child is not None:
                stack.append((path + ".", child))
    return out


class UnitProgram:
    """A unit module's forward as generated code with direct submodule calls (NOTE [ Direct
    calls ]); ``program(module, h)`` is ``module(h)``, which it calls where it cannot stand in.

    ``code`` is a :class:`revify._trace.GraphCode` of the module's traced forward.
    """

    def __init__(self, module: nn.Module, code: Any) -> None:
        self.code = code
        code.callees.called_root = True  # the program stands for the module's own call
        self.forward = type(module).forward
        self.structure = _structure(module)
        # for the last module seen: (epoch, module, the code's function and the modules to
        # pass it, or None where the structure is not the traced one, the modules to check)
        self._checked: tuple[int, Any, Any, list[nn.Module] | None, list[nn.Module]] = (
            -1, None, None, None, [])

    def __call__(self, module: nn.Module, h: torch.Tensor) -> Any:
        checked = self._checked
        if checked[0] != _replay._EPOCH[0] or checked[1] is not module:
            checked = self._check(module)
        passed = checked[3]
        if passed is not None and "forward" not in module.__dict__ and plain_calls(checked[4]):
            return checked[2](module, *passed, h)
        return _MODULE_CALL(module, h)

    def prime(self, module: nn.Module) -> None:
        """Check ``module`` and find its callees now, not at the next call (and so for the
        programs of its submodules)."""
        self._check(module)
        self.code.callees.prime(module)

    def _check(self, module: nn.Module) -> tuple[int, Any, Any, list[nn.Module] | None, list]:
        _replay._install_hooks()  # before caching: a hit then implies the epoch moves
        fn, passed, checked = self.code.direct(module)
        if type(module).forward is not self.forward or _structure(module) != self.structure:
            passed = None
        self._checked = (_replay._EPOCH[0], module, fn, passed, checked)
        return self._checked

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_checked"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._checked = (-1, None, None, None, [])

    def __deepcopy__(self, memo: dict[int, Any]) -> UnitProgram:
        import copy

        new = UnitProgram.__new__(UnitProgram)
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new


def prime(holder: Any) -> None:
    """Find now the modules that ``holder``'s code (a unit's or a segment's) calls directly."""
    program = getattr(holder, "program", None)
    if program is not None:
        program.prime(holder.module)
    root = getattr(holder, "root", None)
    for code in [getattr(holder, "code", None), *getattr(holder, "pieces", ())]:
        callees = getattr(code, "callees", None)
        if callees is not None and root is not None:
            callees.prime(root)
