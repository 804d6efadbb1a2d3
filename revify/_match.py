"""Find residual units in an fx graph and group them into chains.

An *identity residual* is ``add(h, R(h))`` where ``R`` is a single-entry, single-exit region of
the graph that reads only ``h`` (plus parameters and constants), and ``R(h)``, ``h`` and the sum
have one shape. If the add's only user is a same-shape op of the same module (ResNet v1's
``relu(h + F(h))``) it belongs to the unit, which is then used as the black box ``U(h) - h``.
Every other tensor add is classified for the report: *projection* when both operands derive
from a common value through layers of their own (a downsampling shortcut), else *other*.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ._trace import module_path, tensor_shape

__all__: list[str] = []

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


@dataclass(eq=False)
class Residual:
    """One tensor ``add`` node and what it is."""

    add: fx.Node
    kind: str  # "identity", "projection" or "other"
    reason: str = ""
    entry: fx.Node | None = None  # h
    branch: fx.Node | None = None  # R(h)
    region: list[fx.Node] = field(default_factory=list)  # nodes computing R(h), graph order
    post: fx.Node | None = None  # op applied after the add, inside the unit
    skip: list[fx.Node] = field(default_factory=list)  # nn.Identity calls on the skip path
    scale: float = 1.0  # ``torch.add(h, R(h), alpha=scale)``: h + scale * R(h)

    @property
    def exit(self) -> fx.Node:
        return self.post if self.post is not None else self.add

    @property
    def members(self) -> set[fx.Node]:
        out = set(self.region) | set(self.skip) | {self.add}
        if self.post is not None:
            out.add(self.post)
        return out

    @property
    def owner(self) -> str:
        """Path of the innermost module enclosing the add (``""`` for the traced root)."""
        path = module_path(self.add)
        return path[-1] if path else ""


def is_add(node: fx.Node) -> bool:
    """A two-operand add (keyword arguments such as ``alpha=`` are judged by classify_add)."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(node.args) == 2
    if node.op == "call_method" and node.target in ("add", "add_", "__add__"):
        return len(node.args) == 2
    return False


def _scale(add: fx.Node) -> tuple[float | None, str]:
    """The ``alpha`` of ``torch.add(h, b, alpha=alpha)`` (1.0 for plain adds), or None and why
    the add cannot be a residual."""
    extra = sorted(set(add.kwargs) - {"alpha"})
    if extra:
        return None, f"add with {', '.join(f'{k}=' for k in extra)}"
    alpha = add.kwargs.get("alpha", 1.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None, f"add with a computed alpha ({alpha})"
    return float(alpha), ""


def _owner(node: fx.Node) -> list[str]:
    path = module_path(node)
    return path[:-1] if node.op == "call_module" else path


def _branch_region(
    h: fx.Node, br: fx.Node, add: fx.Node, side: frozenset[fx.Node] = frozenset()
) -> tuple[list[fx.Node] | None, str]:
    """Nodes computing ``br`` from ``h`` alone (and the ``side`` placeholders: inputs that are
    the same at every unit of a chain, such as an attention mask), or ``None`` and why not."""
    if br is h:
        return None, "adds a value to itself"
    region: set[fx.Node] = set()
    stack = [br]
    uses_h = False
    while stack:
        n = stack.pop()
        if n is h:
            uses_h = True
            continue
        if n in region:
            continue
        if n.op == "placeholder":
            if n in side:
                continue
            return None, f"branch reads another input ({n.name})"
        region.add(n)
        stack.extend(n.all_input_nodes)
    if not uses_h:
        return None, "branch does not read the skip value"
    _absorb_dead_ends(region, h, add)
    for n in region:
        if n.op == "get_attr":
            continue  # an attribute may be read elsewhere too: each reader fetches it itself
        outside = [u for u in n.users if u not in region and not (n is br and u is add)]
        if outside:
            return None, f"branch value {n.name} is also used by {outside[0].name}"
    order = {n: i for i, n in enumerate(h.graph.nodes)}
    return sorted(region, key=order.__getitem__), ""


def _absorb_dead_ends(region: set[fx.Node], h: fx.Node, add: fx.Node) -> None:
    """Add to ``region`` the nodes computed only from it whose results never leave it.

    Such nodes are metadata reads and checks left unused (``B, N, C = x.shape`` with ``C``
    unused; ``_assert(x.shape[1] == c)``) or in-place side effects with no users (FX_SURVEY.md,
    corner case 5): they belong to the unit.
    """
    candidates: set[fx.Node] = set()
    frontier = [u for n in region for u in n.users]
    while frontier:
        u = frontier.pop()
        if u in region or u in candidates or u is add:
            continue
        if all(a in region or a in candidates or a is h for a in u.all_input_nodes):
            candidates.add(u)
            frontier.extend(u.users)
    pruned = True
    while pruned:  # drop candidates whose value reaches anything outside
        pruned = False
        for c in list(candidates):
            if any(v not in region and v not in candidates for v in c.users):
                candidates.discard(c)
                pruned = True
    region |= candidates


def _skip_path(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Strip ``nn.Identity`` calls off a skip operand: the real skip value and the identities.

    ConvNeXt, RegNet and Res2Net route their shortcut through an ``nn.Identity`` module.
    """
    skip: list[fx.Node] = []
    while (
        node.op == "call_module"
        and node.meta.get("is_identity")
        and len(node.args) == 1
        and isinstance(node.args[0], fx.Node)
        and len(node.users) == 1
    ):
        skip.append(node)
        node = node.args[0]
    return node, skip


def _post_op(add: fx.Node) -> fx.Node | None:
    """The add's single same-shape, same-module user that reads nothing else (e.g. ReLU)."""
    if len(add.users) != 1:
        return None
    (u,) = add.users
    if u.op not in ("call_module", "call_function", "call_method"):
        return None
    if u.all_input_nodes != [add] or tensor_shape(u) != tensor_shape(add):
        return None
    if any(isinstance(a, fx.Node) for a in u.kwargs.values()):
        return None
    return u if _owner(u) == _owner(add) else None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def classify_add(add: fx.Node, side: frozenset[fx.Node] = frozenset()) -> Residual | None:
    """Classify a tensor add node; ``None`` for adds of non-tensors or broadcasting adds.

    ``side``: placeholders a branch may read besides the skip value (see ``_branch_region``).
    """
    a, b = add.args
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    sa, sb, so = tensor_shape(a), tensor_shape(b), tensor_shape(add)
    if sa is None or sb is None or so is None:
        return None
    if sa != sb or sa != so:
        return Residual(add, "other", reason=f"broadcasting add {tuple(sa)} + {tuple(sb)}")
    scale, why = _scale(add)
    if scale is None:
        return Residual(add, "other", reason=f"not a residual: {why}")
    reasons = []
    # torch.add(a, b, alpha=s) is a + s*b: only ``a`` can be the identity side.
    for h_op, br in ((a, b), (b, a)) if scale == 1 else ((a, b),):
        h, skip = _skip_path(h_op)
        region, why = _branch_region(h, br, add, side)
        if region is not None:
            res = Residual(add, "identity", entry=h, branch=br, region=region, skip=skip,
                           scale=scale)
            res.post = _post_op(add)
            return res
        reasons.append(why)
    if scale != 1 and _branch_region(_skip_path(b)[0], a, add, side)[0] is not None:
        why = (f"torch.add(F(x), x, alpha={scale:g}) scales the skip value x "
               "(torch.add(x, F(x), alpha=a) is a residual)")
        return Residual(add, "other", reason=f"not a residual: {why}")
    common = (_ancestors(a) & _ancestors(b)) - side
    if any(n.op != "get_attr" for n in common):
        why = "no identity side: both operands have layers of their own (projection or sum)"
        return Residual(add, "projection", reason=why)
    return Residual(add, "other", reason="not a residual: " + "; ".join(dict.fromkeys(reasons)))


def find_residuals(graph: fx.Graph, side: frozenset[fx.Node] = frozenset()) -> list[Residual]:
    """Every tensor add in graph order, classified (``side``: see ``classify_add``)."""
    out = []
    for node in graph.nodes:
        if is_add(node):
            res = classify_add(node, side)
            if res is not None:
                out.append(res)
    return out


@dataclass(eq=False)
class Unit:
    """An identity residual unit as seen by a chain: its input, output and member nodes."""

    entry: fx.Node
    exit: fx.Node
    members: set[fx.Node]
    residual: Residual | None = None  # None for a whole-module unit (a call_module node)
    # A whole-module unit's call arguments after its input (side inputs such as ``rope=``).
    side_args: tuple[Any, ...] = ()
    side_kwargs: dict[str, Any] = field(default_factory=dict)
    # The unit writes its input in place: a stage gives it a copy (``_inplace.check_units``).
    writes_input: bool = False


def chains(units: list[Unit], tappable: Callable[[fx.Node], bool] | None = None
           ) -> list[list[Unit]]:
    """Group units into maximal chains: unit k's output feeds unit k+1.

    A unit whose output is read outside the next unit ends its chain unless ``tappable`` says
    the stage may hand that state out as well (NOTE [ Taps ] in coupling.py).
    """
    by_entry: dict[fx.Node, list[Unit]] = {}
    for u in units:
        by_entry.setdefault(u.entry, []).append(u)
    starts = {id(u) for u in units}
    nxt: dict[int, Unit] = {}
    for u in units:
        followers = by_entry.get(u.exit, [])
        if len(followers) == 1:
            v = followers[0]
            if (all(user in v.members for user in u.exit.users)
                    or (tappable is not None and tappable(u.exit))):
                nxt[id(u)] = v
                starts.discard(id(v))
    out = []
    for u in units:
        if id(u) in starts:
            chain = [u]
            while id(chain[-1]) in nxt:
                chain.append(nxt[id(chain[-1])])
            out.append(chain)
    return out
