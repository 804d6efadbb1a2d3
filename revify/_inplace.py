"""In-place writes in a traced trunk: which units write their input, and where to clone.

Shape propagation records, per node, the inputs it wrote in place and the input whose memory its
result shares (NOTE [ In-place writes ] in ``_trace.py``). A converted model shares less memory
than the original: a stage's output is a new tensor, and a unit inside a stage reads a stream
state that must not change. Three cases follow:

- A unit that writes its own input (``h += self.f(h); return h``, or a branch that starts with
  ``nn.ReLU(inplace=True)``) is given a copy it may write (``writes_input``), and is run as the
  black box ``U(h) - h``. If the original value is read again after the write (it would see the
  written value), or something else writes the input while the unit reads it, the unit is not
  converted.
- A segment that writes a value made by another step (a stage's output followed by
  ``nn.ReLU(inplace=True)``, the trunk's input) would corrupt what that step saved for backward,
  or, checkpointed, write its own saved input a second time in the recompute: a ``clone`` node
  is inserted in the segment before it first reads the value, and later readers read the clone,
  which is what they read in the original.
- A segment that writes into a view made by another step cannot be fixed that way: refused.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import torch.fx as fx

from ._match import Unit

__all__: list[str] = []


class InplaceError(Exception):
    """An in-place write that a converted model cannot reproduce (message for the user)."""


def _nodes(graph: fx.Graph) -> dict[str, fx.Node]:
    return {n.name: n for n in graph.nodes}


def storage(
    node: fx.Node, by_name: dict[str, fx.Node] | None = None, fresh: Iterable[fx.Node] = ()
) -> fx.Node:
    """The node that made the memory ``node`` lives in (following views), stopping at ``fresh``
    nodes: values the converted model computes into new memory (stage outputs)."""
    by_name = _nodes(node.graph) if by_name is None else by_name
    fresh = set(fresh)
    while node not in fresh and "view_of" in node.meta:
        node = by_name[node.meta["view_of"]]
    return node


def written_from(nodes: Sequence[fx.Node]) -> list[set[fx.Node]]:
    """For each position i, the storages that ``nodes[i:]`` write in place."""
    if not nodes:
        return [set()]
    by_name = _nodes(nodes[0].graph)
    out: list[set[fx.Node]] = [set()]
    for n in reversed(nodes):
        out.append(out[-1] | _written(n, by_name, set()))
    return out[::-1]


def written_values(graph: fx.Graph, fresh: Iterable[fx.Node]) -> set[fx.Node]:
    """The storages any node of ``graph`` writes in place, ``fresh`` values counting as memory
    of their own."""
    by_name, fresh = _nodes(graph), set(fresh)
    return {s for n in graph.nodes for s in _written(n, by_name, fresh)}


def _written(node: fx.Node, by_name: dict[str, fx.Node], fresh: set[fx.Node]) -> set[fx.Node]:
    """Storages ``node`` writes in place."""
    return {storage(by_name[w], by_name, fresh) for w in node.meta.get("writes", ())}


def check_units(graph: fx.Graph, units: Sequence[Unit]) -> tuple[list[Unit], dict[str, str]]:
    """The units that can be converted, with ``writes_input`` set on those writing their input;
    and, for the others, why not (keyed by the unit's exit node name)."""
    by_name = _nodes(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    kept = list(units)
    refused: dict[str, str] = {}
    changed = True
    while changed:  # a refused unit's output is no longer new memory: check the others again
        changed = False
        fresh = {u.exit for u in kept}
        for u in list(kept):
            why = _unit_problem(u, graph, by_name, order, fresh)
            if why is not None:
                kept.remove(u)
                refused[u.exit.name] = why
                changed = True
    return kept, refused


def _unit_problem(
    u: Unit,
    graph: fx.Graph,
    by_name: dict[str, fx.Node],
    order: dict[fx.Node, int],
    fresh: set[fx.Node],
) -> str | None:
    """Why ``u`` cannot be a unit of a stage because of in-place writes, or None (setting
    ``u.writes_input``)."""
    target = storage(u.entry, by_name, fresh)
    if target.op == "get_attr":
        return None
    start = min(order[m] for m in u.members)
    end = order[u.exit]
    first_write = None
    for n in graph.nodes:
        if not start <= order[n] <= end or target not in _written(n, by_name, fresh):
            continue
        if n not in u.members:
            return f"its input is written in place by {n.name} while the unit reads it"
        first_write = order[n] if first_write is None else first_write
    u.writes_input = first_write is not None
    if first_write is None:
        return None
    for v in graph.nodes:
        if order[v] >= first_write or storage(v, by_name, fresh) is not target:
            continue
        late = [w for w in v.users if w not in u.members and order[w] > first_write]
        if late:
            return (f"it writes its input in place and {late[0].name} reads that input again "
                    "after it (it would see the written value, which a stage does not give)")
    return None


def clone_foreign_writes(graph: fx.Graph, found: Sequence[Sequence[Unit]]) -> list[str]:
    """Insert ``clone`` nodes so that no segment writes memory another step made (module
    docstring); returns the names of the values cloned. Raises :class:`InplaceError` where a
    clone cannot restore the original reads."""
    cloned: list[str] = []
    members = {n for chain in found for u in chain for n in u.members}
    fresh = {chain[-1].exit for chain in found}
    while (todo := _foreign_write(graph, found, members, fresh)) is not None:
        w, value, step = todo
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min((u for u in value.users if step[u] == step[w]), key=order.__getitem__)
        with graph.inserting_before(first):
            copy = graph.call_method("clone", (value,))
        copy.meta["tensor_meta"] = value.meta.get("tensor_meta")
        copy.meta["writes"] = []
        for user in list(value.users):
            if user is not copy and order[user] >= order[first]:
                user.replace_input_with(value, copy)
                _rename(user, value.name, copy.name)
        for chain in found:  # a later stage reading the value now reads the clone
            for u in chain:
                if u.entry is value and min(order[m] for m in u.members) >= order[first]:
                    u.entry = copy
                    if u.residual is not None:
                        u.residual.entry = copy
        cloned.append(value.name)
    return cloned


def chains_before(graph: fx.Graph, found: Sequence[Sequence[Unit]]) -> dict[fx.Node, int]:
    """For each node, how many chains run before it: those ending before it in the trace and,
    for a node outside the chains, every chain whose states it reads through a tap, even where
    the trace put it inside that chain's span (NOTE [ Taps ] in coupling.py)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    end = [max(order[n] for u in chain for n in u.members) for chain in found]
    ends = sorted(end)
    chain_of = {n: ci for ci, chain in enumerate(found) for u in chain for n in u.members}
    out: dict[fx.Node, int] = {}
    for n in graph.nodes:
        before = bisect.bisect_left(ends, order[n])
        if n not in chain_of:
            for a in n.all_input_nodes:
                ci = chain_of.get(a)  # after chain ci, and every chain ending before it
                before = max(before, out[a] if ci is None else bisect.bisect_right(ends, end[ci]))
        out[n] = before
    return out


def _steps(graph: fx.Graph, found: Sequence[Sequence[Unit]], members: set[fx.Node]
           ) -> dict[fx.Node, int]:
    """The step running each node: -1 for inputs, 2i for segment i, 2i+1 for stage i (a
    segment is what runs between two chains' ends, as ``_plan._make_steps`` splits it)."""
    before = chains_before(graph, found)
    return {n: -1 if n.op == "placeholder" else 2 * before[n] + (n in members)
            for n in graph.nodes}


def _foreign_write(
    graph: fx.Graph, found: Sequence[Sequence[Unit]], members: set[fx.Node], fresh: set[fx.Node]
) -> tuple[fx.Node, fx.Node, dict[fx.Node, int]] | None:
    """The first segment node writing in place into a value made by another step, with that
    value (and the steps); None if there is none."""
    by_name = _nodes(graph)
    step = _steps(graph, found, members)
    for w in graph.nodes:
        if w in members or w.op in ("placeholder", "output"):
            continue
        for written in w.meta.get("writes", ()):
            node = by_name[written]
            # Up the views made in w's own segment: the first value from elsewhere.
            while step[node] == step[w] and node not in fresh and "view_of" in node.meta:
                node = by_name[node.meta["view_of"]]
            if step[node] == step[w] or node.op == "get_attr":
                continue  # the segment's own memory (recomputed with it), or a buffer
            if storage(node, by_name, fresh) is not node:
                raise InplaceError(
                    f"{w.name} writes in place into {node.name}, a view made outside its "
                    "segment; clone the value before writing into it"
                )
            return w, node, step
    return None


def _rename(node: fx.Node, old: str, new: str) -> None:
    """Point ``node``'s write and view records at ``new`` where they named its input ``old``."""
    node.meta["writes"] = [new if w == old else w for w in node.meta.get("writes", ())]
    if node.meta.get("view_of") == old:
        node.meta["view_of"] = new
