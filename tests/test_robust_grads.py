"""Paths that gave silently wrong results (issue 13 §2): gradient hooks on parameters,
higher-order gradients, torch.compile with dropout, buffers that a forward writes, and units
whose recompute differs from their forward."""

from __future__ import annotations

import contextlib
import copy
import random
import time
import warnings
from collections import defaultdict

import pytest
import timm
import torch
from conftest import (
    CountingBlock,
    InlineNet,
    bn_state,
    counting,
    max_rel_err,
    restore,
    step_grads,
    timm_model,
)
from timm.layers import EvoNorm2dB0
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

import revify
from revify import ConversionError
from revify._replay import _CHECK_EVERY, _CHECK_FIRST, RecomputeCheck
from revify.convert import plans

SIZE = 32


def _resnet() -> nn.Module:
    """A small timm ResNet, float64, train mode: a stem segment in two pieces (the stem, then
    layer1.0 with its projection), stages layer1 and layer2 of two units, a transition."""
    torch.manual_seed(0)
    m = ResNet(
        Bottleneck, [3, 3, 1, 1], channels=(8, 8, 8, 8), stem_width=8, num_classes=3,
        zero_init_last=False,
    ).double()
    revify.convert(m, torch.zeros(2, 3, SIZE, SIZE, dtype=torch.float64))
    return m.train()


def _x(requires_grad: bool = False) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, requires_grad=requires_grad)


def _plain(plain: bool):
    return revify.plain_autograd() if plain else contextlib.nullcontext()


def _segment(model: nn.Module, name: str):
    return next(s for _, p in plans(model) for s in p.segments if s.name == name)


# 1. Gradient hooks ------------------------------------------------------------------------


def test_parameter_hooks_run_once_and_see_the_true_gradient():
    model = _resnet()
    assert len(_segment(model, "stem").pieces) == 2
    hooked = {
        "stem": model.conv1.weight,  # stem segment, first piece
        "stem, layer1.0": model.layer1[0].conv2.weight,  # stem segment, second piece
        "stage layer1": model.layer1[1].conv2.weight,
        "transition": model.layer2[0].conv1.weight,
        "stage layer2": model.layer2[2].conv3.weight,
    }
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    accumulated: dict[str, int] = defaultdict(int)
    for name, p in hooked.items():
        # a scaling hook (gradient clipping or loss scaling do this) that also logs, as DDP's
        # and FSDP2's hooks see the gradient, and a post-accumulate hook (optimizer in backward)
        p.register_hook(lambda g, name=name: (seen[name].append(g.clone()), 2 * g)[1])
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: accumulated.__setitem__(name, accumulated[name] + 1)
        )

    def step(plain: bool):
        seen.clear()
        accumulated.clear()
        model.zero_grad(set_to_none=True)
        state = bn_state(model)
        torch.manual_seed(1)
        with _plain(plain):
            y = model(_x())
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        restore(model, state)
        grads = {name: p.grad.clone() for name, p in hooked.items()}
        return grads, {k: list(v) for k, v in seen.items()}, dict(accumulated)

    ref_grads, ref_seen, ref_acc = step(plain=True)
    grads, seen_rev, acc = step(plain=False)
    assert ref_acc == acc == dict.fromkeys(hooked, 1)
    for name in hooked:
        assert len(seen_rev[name]) == len(ref_seen[name]) == 1, name
        assert max_rel_err(seen_rev[name], ref_seen[name]) < 1e-10, name
        assert max_rel_err([grads[name]], [ref_grads[name]]) < 1e-10, name


def test_hooks_on_a_module_holding_a_stage_are_refused():
    # NOTE [ Hooks on stage holders ]: the trunk runs layer2's stage without calling layer2,
    # so its hooks did not run (a hook halving the output did nothing).
    model = revify.convert(timm_model("resnet18", num_classes=4), torch.zeros(2, 3, 32, 32))
    handle = model.layer2.register_forward_hook(lambda m, i, o: o * 0.5)
    with pytest.raises(RuntimeError, match=r"layer2 \(Sequential\) has module hooks"):
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    model(torch.randn(2, 3, 32, 32))


def _hooked_resnet() -> nn.Module:
    """:func:`_resnet` with DropPath active."""
    torch.manual_seed(0)
    m = ResNet(
        Bottleneck, [3, 3, 1, 1], channels=(8, 8, 8, 8), stem_width=8, num_classes=3,
        zero_init_last=False, drop_path_rate=0.3,
    ).double()
    revify.convert(m, torch.zeros(2, 3, SIZE, SIZE, dtype=torch.float64))
    return m.train()


@pytest.mark.parametrize("where", [
    ("layer1.1", "stage layer1", "layer1.1 (Bottleneck)"),  # a unit
    ("layer2.1.conv2", "stage layer2", "layer2.1.conv2 (Conv2d)"),  # a layer inside a unit
    ("layer2.0.conv1", "segment layer1 -> layer2", "layer2.0.conv1 (Conv2d)"),  # a transition
    ("pre:layer1.2", "stage layer1", "layer1.2 (Bottleneck)"),  # a pre-hook, on a last unit
    ("global", "segment stem", "a global module forward hook"),
])
@pytest.mark.parametrize("precision", ["float64", "bf16"])
def test_forward_hooks_inside_stages_see_the_graph(where, precision):
    # NOTE [ Forward hooks inside stages ]: a reversible stage or checkpointed segment runs its
    # forwards without grad and reuses their memory, so a feature loss on a hooked output got
    # no gradient and read overwritten values. Such a stage now runs as ordinary autograd.
    path, what, named = where
    model = _hooked_resnet()
    x = _x()

    def step(plain: bool, precision: str = precision):
        feats: list[torch.Tensor] = []
        if path == "global":
            handle = nn.modules.module.register_module_forward_hook(
                lambda m, i, o: feats.append(o) if m is model.layer1[1].conv3 else None)
        elif path.startswith("pre:"):
            handle = model.get_submodule(path[4:]).register_forward_pre_hook(
                lambda m, i: feats.append(i[0]))
        else:
            handle = model.get_submodule(path).register_forward_hook(
                lambda m, i, o: feats.append(o))
        torch.manual_seed(7)
        model.to(torch.float64 if precision == "float64" else torch.float32)
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
        try:
            with warnings.catch_warnings(record=True) as caught, _plain(plain), autocast:
                warnings.simplefilter("always")
                y = model(x.to(model.fc.weight.dtype))
                loss = y.float().square().sum() + feats[0].float().square().mean()
            seen = feats[0].detach().clone()
            model.zero_grad()
            loss.backward()
        finally:
            handle.remove()
        grads = [p.grad.clone() for p in model.parameters()]
        return seen, grads, len(feats), [str(w.message) for w in caught]

    seen_ref, grads_ref, calls_ref, _ = step(plain=True)
    seen, grads, calls, caught = step(plain=False)
    assert calls == calls_ref == 1  # not again in a recompute
    assert torch.equal(seen, seen_ref)  # its memory not reused by later states
    if precision == "float64":
        assert max_rel_err(grads, grads_ref) < 1e-10
    else:  # as accurate as ordinary bf16 autograd, against the float64 gradient
        _, truth, _, _ = step(plain=True, precision="float64")
        assert max_rel_err(grads, truth) < 2 * max_rel_err(grads_ref, truth)
    warned = [m for m in caught if "runs as ordinary autograd" in m]
    assert warned and warned[0].startswith(f"revify: {what} runs as ordinary autograd"), caught
    assert named in warned[0]
    # without the hook the stage is reversible again: its units are recomputed in backward
    calls_now = []
    handle = model.layer1[1].register_forward_hook(counting(lambda *_: calls_now.append(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()
    handle.remove()
    assert len(calls_now) == 2


def test_hook_inside_an_inline_unit_is_named_by_its_path():
    # An inline unit (x + f(x) traced from the root) is named after its residual, not a
    # module: the warning names the hooked module by its path in the model.
    model = revify.convert(InlineNet(), torch.zeros(2, 3, 16, 16)).train()
    unit = revify.stages(model)[0].units[1]
    assert type(unit).__name__ == "_GraphUnit" and model.f2 in unit.modules
    handle = model.f2.register_forward_hook(lambda *_: None)
    with pytest.warns(UserWarning, match=r"because of a forward hook on f2 \(Conv2d\)"):
        model(torch.randn(2, 3, 16, 16)).sum().backward()
    handle.remove()


def test_backward_hooks_inside_stages_see_the_true_gradients():
    # Full backward hooks on a unit and on a layer inside one fire in the unit's recompute
    # with the gradients ordinary autograd gives, and what they return is used; the stage
    # stays reversible (no warning).
    model = _hooked_resnet()
    x = _x()

    def step(plain: bool):
        seen: list[torch.Tensor] = []

        def scale(m, grad_in, grad_out):
            seen.extend(g.clone() for g in (*grad_in, *grad_out) if g is not None)
            return tuple(None if g is None else 3 * g for g in grad_in)

        handles = [model.layer1[1].register_full_backward_hook(scale),
                   model.layer2[1].conv2.register_full_backward_pre_hook(
                       lambda m, go: tuple(0.5 * g for g in go))]
        torch.manual_seed(7)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with _plain(plain):
                    loss = model(x).square().sum()
                model.zero_grad()
                loss.backward()
        finally:
            for h in handles:
                h.remove()
        return seen, [p.grad.clone() for p in model.parameters()]

    seen_ref, grads_ref = step(plain=True)
    seen, grads = step(plain=False)
    assert len(seen) == len(seen_ref) == 2
    assert max_rel_err(seen, seen_ref) < 1e-10
    assert max_rel_err(grads, grads_ref) < 1e-10


@pytest.mark.parametrize("where", ["layer1.1.conv1.bias", "layer2.0.conv1.weight"])
def test_weights_updated_between_forward_and_backward_are_refused(where):
    # The recompute reads the weights when backward runs: an update in between (a step before
    # backward(), a clamp) gave gradients of other weights, only warned as a mismatch; ordinary
    # autograd raises for the weights it saved. A conv's bias is not among those, but the
    # recompute would still read it.
    model = timm_model("resnet18", num_classes=4).double()
    model.layer1[1].conv1.bias = nn.Parameter(torch.zeros(64, dtype=torch.float64))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    revify.convert(model, x)
    loss = model(x).square().sum()
    with torch.no_grad():
        model.get_parameter(where).mul_(0.5)
    kind = ("stage layer1, unit layer1.1" if where.startswith("layer1")
            else "segment layer1 -> layer2")
    with pytest.raises(RuntimeError, match=kind + r": 1 of its parameters .* in place"):
        loss.backward()
    model(x).square().sum().backward()  # the next step runs


@pytest.mark.parametrize("switch", ["eval", "train"])
def test_train_eval_switched_between_forward_and_backward_is_refused(switch):
    # The recompute would run the other mode (BatchNorm on running statistics, no dropout):
    # gradient errors of 41x (eval) and 1959x (train), with only a mismatch warning.
    model = timm_model("resnet18", num_classes=4).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    revify.convert(model, x)
    model.train(switch == "train")
    model.layer1.train(switch != "train")  # one stage in the other mode at the forward
    loss = model(x).square().sum()
    model.train(switch != "train")
    with pytest.raises(RuntimeError, match="switched between train and eval mode after"):
        loss.backward()


# 2. Higher-order gradients ----------------------------------------------------------------


def test_gradient_penalty_through_a_stage_raises():
    model = _resnet()
    x = _x(requires_grad=True)
    y = model(x)
    with pytest.raises(RuntimeError, match=r"stage layer\d.*revify\.plain_autograd\(\)"):
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (y.sum() + gx.square().sum()).backward()
    with revify.plain_autograd():  # the fix the message names works
        y = model(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (y.sum() + gx.square().sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_penalty_through_a_segment_matches_plain_autograd():
    model = _resnet()
    seg = _segment(model, "stem")  # two pieces
    params = [p for p in seg.tensors() if p.requires_grad]

    def penalty_grads(plain: bool):
        state = bn_state(model)
        x = _x(requires_grad=True)
        torch.manual_seed(1)
        with _plain(plain):
            (h,) = seg(x)
        out = (h.tanh() * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        grads = torch.autograd.grad(out + gx.square().sum(), [*params, x])
        restore(model, state)
        return grads

    assert max_rel_err(penalty_grads(plain=False), penalty_grads(plain=True)) < 1e-10


@pytest.mark.parametrize("transform", ["grad", "vmap of grad", "jvp"])
def test_torch_func_transforms_run_as_ordinary_autograd(transform):
    # NOTE [ torch.func ]: revify's Functions failed under torch.func with an error naming no
    # revify object; the plan now runs as ordinary autograd there, warned.
    torch.manual_seed(0)
    ref = ResNet(
        Bottleneck, [2, 2, 1, 1], channels=(8, 8, 8, 8), stem_width=8, num_classes=3,
        zero_init_last=False, drop_path_rate=0.3,
    ).double().train()
    model = revify.convert(copy.deepcopy(ref), torch.zeros(2, 3, SIZE, SIZE, dtype=torch.float64))
    for m in (ref, model):  # DropPath active; BatchNorm's running statistics are captured
        for bn in m.modules():  # tensors a transform may not write, converted or not
            if isinstance(bn, nn.BatchNorm2d):
                bn.eval()
    x = _x()
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def run(m: nn.Module):
        state = bn_state(m)
        torch.manual_seed(11)

        def loss(p, x):
            return torch.func.functional_call(m, p, (x,)).square().sum()
        if transform == "grad":
            out = list(torch.func.grad(loss)(params, x).values())
        elif transform == "vmap of grad":
            m.eval()  # per-sample gradients: no DropPath across the batch
            out = list(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(
                params, x.unsqueeze(1)).values())
        else:
            out = [torch.func.jvp(m, (x,), (torch.ones_like(x),))[1]]
        restore(m, state)
        return out

    expected = run(ref)
    with pytest.warns(UserWarning, match="under a torch.func transform"):
        got = run(model)
    assert max_rel_err(got, expected) < 1e-10
    assert model.training == (transform != "vmap of grad")
    assert model.layer1[1].drop_path.training == model.training


# 3. torch.compile ---------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.tanh(self.bn(self.conv(x))))


class _DropoutNet(nn.Module):
    """timm's layout: ``forward_features`` (converted), then a head with its own dropout."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.Dropout(0.2))
        self.blocks = nn.Sequential(*(_Block(width) for _ in range(3)))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(x.mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_torch_compile_with_dropout_gives_true_gradients():
    # The converted trunk runs eagerly inside torch.compile, its recompute replaying the
    # forward's dropout masks; before, inductor drew other masks (finite-difference error 0.1-2).
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _DropoutNet().double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # RevNet's float streams: the exact default rounds its streams onto a grid, a step
    # function that finite differences cannot see through.
    revify.convert(model, x, coupling="revnet")
    compiled = torch.compile(model)
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout masks at every call, eager or inductor
        return compiled(x).square().sum()

    start = time.perf_counter()
    grads = torch.autograd.grad(loss(), params)
    compile_s = time.perf_counter() - start
    print(f"first compiled step: {compile_s:.1f} s")
    gen = torch.Generator().manual_seed(1)
    errors = []
    for _ in range(3):
        d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, v in zip(params, d, strict=True):
                p.add_(v, alpha=1e-6)
            up = loss().item()
            for p, v in zip(params, d, strict=True):
                p.add_(v, alpha=-2e-6)
            down = loss().item()
            for p, v in zip(params, d, strict=True):
                p.add_(v, alpha=1e-6)
        fd = (up - down) / 2e-6
        exact = sum(float((g * v).sum()) for g, v in zip(grads, d, strict=True))
        errors.append(abs(fd - exact) / abs(fd))
    assert max(errors) < 1e-6, (errors, compile_s)
    torch._dynamo.reset()


def test_compiled_converted_model_breaks_once_and_never_recompiles():
    # The trunk is one torch.compiler.disable'd call: dynamo compiles what is around it (the
    # head) and breaks the graph there; a step must not recompile.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = revify.convert(timm_model("resnet18", num_classes=4), torch.zeros(2, 3, 32, 32))
    compiled = torch.compile(model, backend="eager")
    for _ in range(3):
        compiled(torch.randn(2, 3, 32, 32)).sum().backward()
    breaks = sum(counters["graph_break"].values())
    print(f"graph breaks: {breaks} at {len(counters['graph_break'])} place(s), recompiles: "
          f"{sum(counters['recompiles'].values())}")
    (reason,) = counters["graph_break"]  # one place: the trunk's plan
    assert "revify: a converted trunk runs eagerly" in reason
    assert breaks <= 3 and not counters["recompiles"]
    torch._dynamo.reset()


def test_convert_of_a_compiled_model_converts_the_module_it_wraps():
    torch._dynamo.reset()
    model = timm_model("resnet18", num_classes=4).double()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    compiled(x)  # compiled before conversion: dynamo must see the converted trunk after
    assert revify.convert(compiled, x) is compiled
    assert [len(st.units) for st in revify.stages(model)] == [2, 1, 1, 1]
    _, ref = step_grads(model, x, plain=True)
    _, rev = step_grads(compiled, x, plain=False)
    assert revify.stages(model)[0].last_reconstruction_error is not None  # the stage ran
    assert max_rel_err(rev, ref) < 1e-10
    torch._dynamo.reset()


def test_compiled_blocks_are_refused_with_the_fix():
    model = timm_model("resnet18", num_classes=4)
    model.layer1[0].compile()
    model.layer2[1] = torch.compile(model.layer2[1])
    with pytest.raises(ConversionError, match=r"layer1\.0, layer2\.1 are compiled.*"
                       r"torch\.compile\(revify\.convert\(model\)\)"):
        revify.convert(model, torch.zeros(2, 3, 32, 32))
    assert not revify.stages(model)



@pytest.mark.parametrize("where", ["unit", "segment", "wrapped submodule"])
def test_blocks_compiled_after_convert_are_refused_at_a_step_and_run_under_no_grad(where):
    # NOTE [ Compiled units ]: a compiled unit's forward and recompute are two graphs (the
    # default coupling amplified their last-bit difference into 30 % gradient errors). The
    # eager backend is enough to set the flag the check reads.
    torch._dynamo.reset()
    model = revify.convert(timm_model("resnet18", num_classes=4), torch.zeros(2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    if where == "unit":
        model.layer1[1].compile(backend="eager")
        match = r"stage layer1, unit layer1\.1, runs a module compiled after convert \(BasicBlock"
    elif where == "segment":
        model.layer2[0].compile(backend="eager")
        match = r"segment layer1 -> layer2 runs a module compiled after convert \(BasicBlock"
    else:
        model.layer1[0].conv2 = torch.compile(model.layer1[0].conv2, backend="eager")
        match = r"unit layer1\.0, runs a module compiled after convert \(OptimizedModule"
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    model.train()
    with pytest.raises(RuntimeError, match=match + r".*torch\.compile\(model\)"):
        model(x).sum().backward()
    with revify.plain_autograd():  # plain autograd of the compiled block is fine
        model(x).sum().backward()
    assert model.layer1[0].conv1.weight.grad is not None
    torch._dynamo.reset()

# 4. Buffers written in forward --------------------------------------------------------------


class _Counted(nn.Module):
    """Counts its calls in a buffer, in place or by replacing it."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.inplace = inplace
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            self.count += 1
        else:
            self.count = self.count + 1
        return x


class _StatNet(nn.Module):
    """Running statistics that are not BatchNorm's, in the stem segment and in stage units."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.InstanceNorm2d(width, affine=True, track_running_stats=True),
            _Counted(),
        )
        self.f1 = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.InstanceNorm2d(width, track_running_stats=True),
            nn.Tanh(),
            _Counted(inplace=False),
        )
        self.f2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), EvoNorm2dB0(width))
        self.f3 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.Tanh(), _Counted())
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.f1(x)
        x = x + self.f2(x)
        x = x + self.f3(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("exact", [False, True])
def test_buffers_written_in_forward_are_updated_once(exact, monkeypatch):
    torch.manual_seed(0)
    model = _StatNet().double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    coeffs = dict(alpha=15 / 16, beta=1 / 16, exact=True) if exact else dict(coupling="revnet")
    if exact:  # far too little headroom: each forward is redone on a coarser grid
        monkeypatch.setattr(revify._exact, "HEADROOM_BITS", -2)
        redone = []
        regrid = revify._exact.regrid
        monkeypatch.setattr(revify._exact, "regrid",
                            lambda *a: redone.append(1) or regrid(*a))
    revify.convert(model, x, **coeffs)
    (stage,) = revify.stages(model)
    assert [u.name for u in stage.units] == ["f1", "f2", "f3"]
    assert _segment(model, "stem").checkpoint
    ref = copy.deepcopy(model)
    for step in range(2):  # the first step copies every buffer, later ones only those written
        torch.manual_seed(step)
        y = model(x)
        (y * y).sum().backward()
        torch.manual_seed(step)
        with revify.plain_autograd():
            y_ref = ref(x)
        (y_ref * y_ref).sum().backward()
        buffers = dict(model.named_buffers())
        for name, b in ref.named_buffers():
            assert torch.equal(buffers[name], b), (step, name)
        assert model.stem[2].count.item() == model.f3[2].count.item() == step + 1
    grads = [p.grad for p in model.parameters()]
    assert max_rel_err(grads, [p.grad for p in ref.parameters()]) < 1e-10
    if exact:
        assert len(redone) > 4  # each forward checked its grid at least twice: it was redone


class _SpectralBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.utils.spectral_norm(nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.conv(x))


class _SpectralNet(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*(_SpectralBlock(width) for _ in range(3)))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _spectral_net(x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = _SpectralNet().double().train()
    return revify.convert(model, x)


def test_spectral_norm_recompute_replays_the_power_iteration():
    # spectral_norm updates its vectors u, v in every training forward; the recompute now
    # reads them as the forward did (gradient error 1e-3-1e-6 before, u updated twice).
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model, ref = _spectral_net(x), _spectral_net(x)
    assert len(revify.stages(model)[0].units) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(3):
            grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
            with revify.plain_autograd():
                y = ref(x)
            ref_grads = torch.autograd.grad(y.square().sum(), list(ref.parameters()))
            assert max_rel_err(grads, ref_grads) < 1e-10
            for (name, b), b_ref in zip(model.named_buffers(), ref.buffers(), strict=True):
                assert torch.equal(b, b_ref), name


# 5. Recomputes that differ from their forward -----------------------------------------------


class _PyRandomDepthBlock(nn.Module):
    """Stochastic depth drawn with Python's ``random``: the recompute draws another number."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.tanh(self.conv(x))
        return x if self.training and random.random() < 0.5 else x + r


class _PyCounterScale(nn.Module):
    """Not a residual: scales by a Python call counter, so a checkpointed recompute differs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * (1 + self.calls % 2)


class _MismatchNet(nn.Module):
    def __init__(self, odd: type[nn.Module] = _Block, odd_stem: bool = False, width: int = 6):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), _PyCounterScale() if odd_stem else nn.Identity()
        )
        self.blocks = nn.Sequential(_Block(width), odd(width), _Block(width))
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.blocks(self.stem(x))).mean((2, 3)))


def _mismatch_net(odd: type[nn.Module], dtype=torch.float32, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = _MismatchNet(odd, **kwargs).to(dtype).train()
    return revify.convert(model, torch.zeros(2, 3, 8, 8, dtype=dtype))


def _steps(model: nn.Module, n: int, dtype=torch.float32) -> None:
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    for _ in range(n):
        model(x).square().sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_unit_whose_recompute_differs_warns_once_naming_it(dtype):
    model = _mismatch_net(CountingBlock, dtype)
    assert len(revify.stages(model)[0].units) == 3
    with pytest.warns(RuntimeWarning, match=r"stage blocks, unit blocks\.1: .*Python") as rec:
        _steps(model, 3, dtype)
    assert len([w for w in rec if "revify" in str(w.message)]) == 1  # once per stage


def test_python_random_stochastic_depth_is_detected():
    random.seed(0)
    model = _mismatch_net(_PyRandomDepthBlock)
    with pytest.warns(RuntimeWarning, match=r"unit blocks\.1: the activations recomputed in"):
        _steps(model, 6)


def test_a_segment_whose_recompute_differs_warns():
    model = _mismatch_net(_Block, odd_stem=True)
    assert _segment(model, "stem").checkpoint
    with pytest.warns(RuntimeWarning, match=r"segment stem: the activations recomputed in"):
        _steps(model, 2)


def test_on_mismatch_raise_and_ignore():
    model = revify.set_on_mismatch(_mismatch_net(CountingBlock), "raise")
    with pytest.raises(RuntimeError, match=r"unit blocks\.1: the activations recomputed in"):
        _steps(model, 1)
    model = revify.set_on_mismatch(_mismatch_net(CountingBlock), "ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _steps(model, 2)
    with pytest.raises(ValueError, match="on_mismatch must be one of"):
        revify.stages(model)[0].on_mismatch = "error"


def test_no_mismatch_reported_on_honest_models(converted_resnet18):
    # resnet18 with DropPath in fp32 and bf16 autocast, convnext_atto with layer scale 0.5
    torch.manual_seed(0)
    convnext = timm.create_model("convnext_atto", ls_init_value=0.5, drop_path_rate=0.2)
    revify.convert(convnext, torch.zeros(2, 3, SIZE, SIZE))
    x = torch.randn(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for model in (converted_resnet18.train(), convnext.train()):
            for autocast in (False, True):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    y = model(x)
                y.float().square().mean().backward()
            assert all(st.checked_passes == 2 for st in revify.stages(model))


def test_mismatch_check_schedule():
    class Owner:
        on_mismatch, mismatch_tolerance, checked_passes = "warn", None, 0

    x = torch.zeros(2)
    due = [RecomputeCheck.due(Owner, x) is not None for _ in range(2 * _CHECK_EVERY)]
    assert due[:_CHECK_FIRST] == [True] * _CHECK_FIRST
    assert sum(due) == _CHECK_FIRST + 2  # then passes 50 and 100
    assert RecomputeCheck.due(Owner, torch.zeros(2, dtype=torch.float64)) is None
