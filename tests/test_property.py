"""Property-based test: random residual networks, converted, keep their function and gradients
(issue 13, section 5).

A network is drawn as a small description (:class:`NetSpec`): 1-3 stages of 1-8 residual units
with a strided convolution between stages; each unit a block module or an inline residual in
the root's ``forward``, spelled ``x + f(x)``, ``f(x) + x``, ``torch.add(x, f(x))`` or
``out = f(x); out += x``, with an optional post-add activation; branches of convolutions,
norms (BatchNorm in train mode, a channel LayerNorm, GroupNorm), activations, dropout and layer
scale. Built in float64 and converted with ``alpha=0, beta=1``, it must:

(a) be refused by ``convert`` with a clear error, or run forward and backward;
(b) give the gradients of ordinary autograd of the same function (``plain_autograd()``), to
    1e-10, or to 10x plain autograd's own rounding spread where its backward amplifies
    rounding beyond that (:func:`_rounding_spread`);
(c) compute the function of the coupling that ``plain_autograd()`` runs, also without grad, and
    the original network's when every chain has one unit (the coupling is then the identity
    residual itself).

The fast profile runs in the default suite; the long one (``-m slow``) draws 500 networks.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import bn_state, max_rel_err, restore, step_grads
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import revify
from revify import ConversionError

_LAYERS = ("conv3", "conv1", "bn", "ln", "gn", "relu", "gelu", "tanh", "dropout", "scale")
_SPELLINGS = ("x+f", "f+x", "torch.add", "iadd")
_SIZE = 8  # input height and width; halved by each stage transition
_TOL = 1e-10

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class UnitSpec:
    block: bool  # a module of its own, else written inline in the root's forward
    spelling: str  # one of _SPELLINGS
    branch: tuple[str, ...]  # layers of f, from _LAYERS
    post: str | None  # activation after the add: "relu", "gelu" or None
    shared: bool = False  # inline only: f is the previous inline unit's module (called twice)


@dataclass(frozen=True)
class StageSpec:
    units: tuple[UnitSpec, ...]
    container: str  # "root": called one by one from the root; "sequential"/"loop": blocks only
    lead: tuple[UnitSpec, ...] = ()  # inline units before a container's blocks

    def sequence(self) -> tuple[UnitSpec, ...]:
        """The units in the order the forward runs them (one chain, if nothing breaks it)."""
        return self.lead + self.units


@dataclass(frozen=True)
class NetSpec:
    width: int
    stages: tuple[StageSpec, ...]


# ----------------------------------------------------------------------------- strategies


@st.composite
def units(draw: st.DrawFn, block: bool | None = None) -> UnitSpec:
    is_block = draw(st.booleans()) if block is None else block
    spelling = draw(st.sampled_from(_SPELLINGS))
    branch = draw(st.lists(st.sampled_from(_LAYERS), min_size=1, max_size=4))
    if spelling == "iadd" and branch[-1] in ("relu", "tanh"):
        branch.append("conv1")  # ``out += x`` on a ReLU's output cannot train, converted or not
    return UnitSpec(
        block=is_block,
        spelling=spelling,
        branch=tuple(branch),
        post=draw(st.sampled_from((None, None, "relu", "gelu"))),
        shared=not is_block and draw(st.integers(0, 3)) == 3,  # shrinks to False
    )


@st.composite
def stages(draw: st.DrawFn) -> StageSpec:
    container = draw(st.sampled_from(("root", "root", "sequential", "loop")))
    if container == "root":
        return StageSpec(tuple(draw(st.lists(units(), min_size=1, max_size=8))), container)
    blocks = tuple(draw(st.lists(units(block=True), min_size=1, max_size=8)))
    lead = tuple(draw(st.lists(units(block=False), max_size=min(2, 8 - len(blocks)))))
    return StageSpec(blocks, container, lead)


nets = st.builds(
    NetSpec,
    width=st.sampled_from((4, 6, 8)),
    stages=st.lists(stages(), min_size=1, max_size=3).map(tuple),
)


# ----------------------------------------------------------------------------- models


class ChannelLN(nn.Module):
    """LayerNorm over channels of a (B, C, H, W) tensor (ConvNeXt's ``LayerNorm2d``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Scale(nn.Module):
    """Layer scale: a learnable per-channel factor, drawn in [0.1, 1] (not 1e-6: the branch
    must matter for the test to see anything)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(0.1 + 0.9 * torch.rand(c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def _layer(kind: str, c: int) -> nn.Module:
    return {
        "conv3": lambda: nn.Conv2d(c, c, 3, padding=1),
        "conv1": lambda: nn.Conv2d(c, c, 1),
        "bn": lambda: nn.BatchNorm2d(c),
        "ln": lambda: ChannelLN(c),
        "gn": lambda: nn.GroupNorm(2, c),
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "dropout": lambda: nn.Dropout(0.2),
        "scale": lambda: Scale(c),
    }[kind]()


def _residual(spelling: str, x: Tensor, f: nn.Module, post: str | None) -> Tensor:
    """One residual add in the given spelling; fx traces the Python branches away."""
    if spelling == "x+f":
        out = x + f(x)
    elif spelling == "f+x":
        out = f(x) + x
    elif spelling == "torch.add":
        out = torch.add(x, f(x))
    else:  # in place on f's fresh output (torchvision's ``out += identity``)
        out = f(x)
        out += x
    if post == "relu":
        return torch.relu(out)
    if post == "gelu":
        return nn.functional.gelu(out)
    return out


class Block(nn.Module):
    def __init__(self, spec: UnitSpec, c: int) -> None:
        super().__init__()
        self.spelling, self.post = spec.spelling, spec.post
        self.f = nn.Sequential(*(_layer(k, c) for k in spec.branch))

    def forward(self, x: Tensor) -> Tensor:
        return _residual(self.spelling, x, self.f, self.post)


class Net(nn.Module):
    """The network a :class:`NetSpec` describes (3 input channels, 3 classes)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        c = spec.width
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.down = nn.ModuleList(
            nn.Conv2d(c, c, 3, stride=2, padding=1) for _ in spec.stages[1:]
        )
        self.containers = nn.ModuleDict()  # stage i's blocks, when held by a container
        self.blocks = nn.ModuleDict()  # blocks called from the root, key "i_j"
        self.branches = nn.ModuleDict()  # inline units' f, key "i_j"
        self.inline_f: dict[str, str] = {}  # unit key -> key of the f it calls
        last_inline = None
        for i, stage in enumerate(spec.stages):
            if stage.container != "root":
                blocks = [Block(u, c) for u in stage.units]
                if stage.container == "sequential":
                    self.containers[str(i)] = nn.Sequential(*blocks)
                else:
                    self.containers[str(i)] = nn.ModuleList(blocks)
            inline = stage.lead if stage.container != "root" else stage.units
            for j, u in enumerate(inline):
                key = f"{i}_{j}"
                if u.block:
                    self.blocks[key] = Block(u, c)
                elif u.shared and last_inline is not None:
                    self.inline_f[key] = last_inline
                else:
                    self.branches[key] = nn.Sequential(*(_layer(k, c) for k in u.branch))
                    self.inline_f[key] = last_inline = key
        self.head = nn.Linear(c, 3)

    def _units(self, i: int, units: tuple[UnitSpec, ...], x: Tensor) -> Tensor:
        for j, u in enumerate(units):
            key = f"{i}_{j}"
            if u.block:
                x = self.blocks[key](x)
            else:
                x = _residual(u.spelling, x, self.branches[self.inline_f[key]], u.post)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i, stage in enumerate(self.spec.stages):
            if i > 0:
                x = self.down[i - 1](x)
            if stage.container == "root":
                x = self._units(i, stage.units, x)
                continue
            x = self._units(i, stage.lead, x)
            if stage.container == "sequential":
                x = self.containers[str(i)](x)
            else:
                for blk in self.containers[str(i)]:
                    x = blk(x)
        return self.head(x.mean((2, 3)))


def build(spec: NetSpec, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net(spec).double().train()


# ----------------------------------------------------------------------------- known bugs


def known_bugs(spec: NetSpec) -> list[str]:
    """Crash classes of issue 13, section 1, that ``spec`` hits; other engineers are fixing
    them. ``convert`` succeeds and the first forward fails.

    The fast profile skips them (``assume``) so that the default suite stays green; the long
    profile keeps them, and fails until they are fixed.
    """
    out = []
    for stage in spec.stages:
        seq = stage.sequence()
        if len(seq) == 1 and not seq[0].block:
            # "a chain of exactly one inline unit": ConversionError "Sequential holding stage
            # branches.0_0 was called directly but cannot be converted on its own"
            out.append("one-inline-unit chain")
        if any(not a.block and b.block for a, b in zip(seq, seq[1:], strict=False)):
            # "an inline residual followed by blocks called in a for loop: KeyError"; called
            # one by one from the root too (KeyError: 'add')
            out.append("inline unit followed by a block")
    return out


# ----------------------------------------------------------------------------- the property


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _runs(model: nn.Module, x: Tensor) -> bool:
    """Whether the unconverted model trains at all (``out += x`` on a ReLU's output does not:
    autograd needs that output)."""
    state = bn_state(model)
    try:
        model(x).sum().backward()
        return True
    except RuntimeError:
        return False
    finally:
        restore(model, state)
        model.zero_grad(set_to_none=True)


def _forward(model: nn.Module, x: Tensor, seed: int = 1) -> Tensor:
    state = bn_state(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        y = model(x)
    restore(model, state)
    return y


def _rounding_spread(model: nn.Module, x: Tensor, g_plain: list) -> float:
    """How far plain autograd's gradients move when only the backward's rounding changes (the
    loss scaled by 3 and by 7). A backward can amplify rounding far beyond 1e-10 in float64: a
    LayerNorm of an all-zero pixel (after a ReLU) multiplies the gradient by 1/sqrt(eps) = 316,
    three in a row by 3e7, and revify's adjoints, summed in another order, differ by as much."""
    return max(max_rel_err(step_grads(model, x, plain=True, scale=s)[1], g_plain)
               for s in (3.0, 7.0))


def _kink_tie(model: nn.Module, spec: NetSpec, x: Tensor) -> bool:
    """Whether a gradient gap is the known limit of float reconstruction, not a bug: the states
    were rebuilt to rounding (1e-9 at most, deep stages amplify it) and exact streams (bit-exact
    rebuilds) agree with plain autograd. A state with exact zeros (a ReLU after the add) comes
    back as +-1e-15, and a later ReLU of exactly 0 in the forward (a LayerNorm of an all-zero
    pixel, ``relu(h + gelu(h))`` at h = 0) takes the other one-sided derivative in the
    recompute; README, Limitations."""
    rebuilt = [s.last_reconstruction_error for s in revify.stages(model)]
    if any(e is None or float(e) > 1e-9 for e in rebuilt):
        return False
    exact = build(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        revify.convert(exact, torch.zeros_like(x), alpha=0.0, beta=1.0, exact=True)
    _, g_rev = step_grads(exact, x, plain=False)
    _, g_plain = step_grads(exact, x, plain=True)
    return max_rel_err(g_rev, g_plain) <= _TOL


def check(spec: NetSpec) -> str:
    """Assert (a)-(c) for the network ``spec`` describes; returns what happened: "converted"
    (or "converted, ill-conditioned backward": gradients within 10x plain autograd's own
    rounding spread, beyond 1e-10), "unchanged" (no chain), "refused" (a clear error at
    convert), or, for networks the property does not apply to, "untrainable", "kink tie"."""
    model = build(spec)
    x = torch.randn(2, 3, _SIZE, _SIZE, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    if not _runs(model, x):
        return "untrainable"  # not a trainable network to begin with
    original = copy.deepcopy(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no chain found" and the like
            revify.convert(model, torch.zeros_like(x), alpha=0.0, beta=1.0)
    except (ConversionError, TypeError, ValueError) as e:
        assert str(e).startswith("revify"), f"refusal without revify's prefix: {e!r}"
        return "refused"
    chain_units = [len(s.units) for s in revify.stages(model)]
    y_rev, g_rev = step_grads(model, x, plain=False)
    y_plain, g_plain = step_grads(model, x, plain=True)
    assert _rel(y_rev, y_plain) <= _TOL, "(c) reversible forward differs from plain_autograd"
    err = max_rel_err(g_rev, g_plain)
    outcome = "converted" if chain_units else "unchanged"
    if err > _TOL:
        spread = _rounding_spread(model, x, g_plain)
        if err <= 10 * spread:  # as close as plain autograd is to itself
            outcome = "converted, ill-conditioned backward"
        elif _kink_tie(model, spec, x):
            return "kink tie"  # the documented limit, see _kink_tie
        else:
            raise AssertionError(f"(b) gradients differ from plain_autograd: {err:.3g} "
                                 f"(plain autograd's own rounding spread {spread:.3g})")
    y_ng = _forward(model, x)
    assert _rel(y_ng, y_plain) <= _TOL, "(c) no-grad forward differs from plain_autograd"
    if all(n == 1 for n in chain_units):
        y_orig = _forward(original, x)
        assert _rel(y_plain, y_orig) <= _TOL, "(c) one-unit chains differ from the original"
    assert all(math.isfinite(float(g.abs().max())) for g in g_rev if g is not None)
    return outcome


_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


_SKIPPED = ("untrainable", "kink tie")


@settings(max_examples=25, derandomize=True, **_COMMON)
@given(nets)
def test_random_residual_networks(spec):
    assume(not known_bugs(spec))
    outcome = check(spec)
    event(outcome)
    assume(outcome not in _SKIPPED)


@pytest.mark.slow
@settings(max_examples=500, **_COMMON)
@given(nets)
def test_random_residual_networks_long(spec):
    outcome = check(spec)
    event(outcome)
    assume(outcome not in _SKIPPED)


def test_recompute_reads_the_forward_layout():
    """Found by the property above: ``f(x) + x`` with ``f`` ending in a channel LayerNorm (a
    permuted view) makes the stage's last state channels-last while the states before were
    contiguous. Unit 0's input, rebuilt in that state's memory, was recomputed channels-last,
    and its dropout replayed the RNG into another memory order: another mask, float64
    gradients 0.43 off plain autograd's, silently (NOTE [ Recompute layout ])."""
    spec = NetSpec(4, (StageSpec((
        UnitSpec(block=True, spelling="x+f", branch=("dropout",), post=None),
        UnitSpec(block=True, spelling="f+x", branch=("ln",), post=None),
    ), "root"),))
    assert check(spec) == "converted"
