"""Run traced code with its module calls made directly: ``m.forward(x)`` instead of ``m(x)``.

Every unit runs twice per step (forward and recompute), and at batch 64 on a GPU the step is
host-bound, so the Python of each module call is step time (issue 14). See NOTE [ Direct calls ].
"""

from __future__ import annotations

import operator
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
# A whole-module unit (a timm Bottleneck) is traced on its own for this (UnitProgram): its
# forward becomes generated code whose submodule calls are direct. That trace freezes what the
# trunk's trace freezes (Python branches on attributes, which submodules are None), so it is
# made only where the eager forward can be checked against it at conversion (_plan.py:
# the same value on a random input, the same code in train and eval mode), and the modules it
# calls must keep their classes and the submodules that were None stay None: else the unit runs
# its own forward, as before.

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
        any(chain(_GLOBAL_HOOKS(_module), chain.from_iterable(map(_HOOK_STATE, modules))))
        or _tracing_state() is not None
        or _is_compiling()
    )


def direct_graph(graph: fx.Graph) -> tuple[fx.Graph, list[str]]:
    """A copy of ``graph`` whose module calls are ``forward`` calls on modules passed as its
    first inputs, and the module paths, one per such input."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    calls = [n for n in graph.nodes if n.op == "call_module"]
    paths = list(dict.fromkeys(str(n.target) for n in calls))
    module_inputs = {p: g.placeholder(f"m{i}_{p.replace('.', '_')}") for i, p in enumerate(paths)}
    for n in graph.nodes:
        if n.op == "call_module":
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            env[n] = g.call_method("forward", (module_inputs[str(n.target)], *args), kwargs)
            env[n].meta = dict(n.meta)
        else:
            env[n] = g.node_copy(n, env.__getitem__)
    return g, paths


class Callees:
    """The modules a direct graph calls, found by path from its root and kept until a module,
    parameter or buffer is registered anywhere (NOTE [ Direct calls ])."""

    __slots__ = ("paths", "called_root", "_found")

    def __init__(self, paths: Sequence[str], called_root: bool = False) -> None:
        self.paths = list(paths)
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

    def _find(self, root: nn.Module) -> tuple[int, nn.Module, list[nn.Module] | None, list]:
        _replay._install_hooks()  # before caching: a hit then implies the epoch moves
        try:
            modules: list[nn.Module] | None = [root.get_submodule(p) for p in self.paths]
        except AttributeError:  # a path gone: the ordinary code raises as it would have
            modules = None
        checked = [root, *(modules or [])] if self.called_root else list(modules or [])
        if any(type(m).__call__ is not _MODULE_CALL for m in checked):
            modules = None
        self._found = (_replay._EPOCH[0], root, modules, checked)
        return self._found

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "called_root": self.called_root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.paths, self.called_root = state["paths"], state.get("called_root", False)
        self._found = None

    def __deepcopy__(self, memo: dict[int, Any]) -> Callees:
        return Callees(self.paths, self.called_root)


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
        # (epoch, module, whether its structure is the traced one), for the last module checked
        self._checked: tuple[int, Any, bool] = (-1, None, False)

    def __call__(self, module: nn.Module, h: torch.Tensor) -> Any:
        checked = self._checked
        if checked[0] != _replay._EPOCH[0] or checked[1] is not module:
            checked = self._check(module)
        if checked[2] and "forward" not in module.__dict__:
            callees = self.code.callees.of(module)
            if callees is not None:
                return self.code.run_direct(module, callees, h)
        return _MODULE_CALL(module, h)

    def prime(self, module: nn.Module) -> None:
        """Check ``module`` and find its callees now, not at the next call."""
        self._check(module)
        self.code.callees.of(module)

    def _check(self, module: nn.Module) -> tuple[int, Any, bool]:
        _replay._install_hooks()  # before caching: a hit then implies the epoch moves
        same = type(module).forward is self.forward and _structure(module) == self.structure
        self._checked = (_replay._EPOCH[0], module, same)
        return self._checked

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_checked"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._checked = (-1, None, False)

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
            callees.of(root)
