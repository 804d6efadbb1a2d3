"""Hand-written residual networks that broke the plan or were refused unclearly (issue 13, 1 and 3).

Each model is converted in float64 and checked the way the project checks every path: the
converted model runs (with and without grad), its gradients equal ordinary autograd of the same
function (``revify.plain_autograd()``), and where every stage has a single unit its output and
gradients equal the unconverted model's. Small shapes (32 px, width 4) keep each test fast.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from conftest import max_rel_err, step_grads, timm_model
from torch import nn

import revify
from revify import ConversionError

W = 4
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _converted(model: nn.Module, x: torch.Tensor = X, same_function: bool = False,
               **options) -> nn.Module:
    """Convert ``model`` (float64) and check it against plain autograd of the same function,
    and against the unconverted model when ``same_function`` (single-unit stages)."""
    model = model.double()
    original = copy.deepcopy(model)
    revify.convert(model, x, **options)
    assert revify.stages(model), "nothing was converted"
    y_plain, g_plain = step_grads(model, x, plain=True)
    y, g = step_grads(model, x, plain=False)
    torch.testing.assert_close(y, y_plain, rtol=1e-12, atol=1e-12)
    assert max_rel_err(g, g_plain) < 1e-10
    with torch.no_grad():
        torch.manual_seed(1)
        y_nograd = model(x)
    torch.testing.assert_close(y_nograd, y_plain, rtol=1e-12, atol=1e-12)
    if same_function:
        y_orig, g_orig = step_grads(original, x, plain=False)
        torch.testing.assert_close(y, y_orig, rtol=1e-10, atol=1e-12)
        assert max_rel_err(g, g_orig) < 1e-10
    return model


def _units(model: nn.Module) -> list[list[str]]:
    return [[u.name for u in st.units] for st in revify.stages(model)]


class Block(nn.Module):
    """``x + tanh(conv(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(W, W, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.conv(x))


def _branch() -> nn.Module:
    return nn.Sequential(nn.Conv2d(W, W, 3, padding=1), nn.BatchNorm2d(W), nn.Tanh())


# ---------------------------------------------------------------------------------------------
# 1. Plans that crashed at the first forward


class OneInline(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.f = _branch()
        self.head = nn.Linear(W, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.f(x)
        return self.head(x.mean((2, 3)))


def test_chain_of_one_inline_unit():
    """The one-unit chain is named after its branch module ``f``; ``f`` itself must keep its
    forward (the stage calls it), not be made the stage's container."""
    model = _converted(OneInline(), same_function=True)
    assert _units(model) == [["f"]]
    assert "forward" not in model.f.__dict__


class OneByOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.b1 = Block()
        self.down = nn.Conv2d(W, W, 3, stride=2, padding=1)
        self.b2 = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.down(self.b1(self.stem(x)))).mean((2, 3))


def test_blocks_called_one_by_one_around_a_strided_conv():
    model = _converted(OneByOne(), same_function=True)
    assert _units(model) == [["b1"], ["b2"]]
    assert "forward" not in model.b1.__dict__ and "forward" not in model.b2.__dict__


class InlineThenLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.f = _branch()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.f(x)
        for blk in self.blocks:
            x = blk(x)
        return x.mean((2, 3))


def test_inline_residual_then_blocks_in_a_loop():
    """The add before ``blocks.0`` is the first unit, not ``blocks.0`` its post-add op."""
    model = _converted(InlineThenLoop())
    assert _units(model) == [["f", "blocks.0", "blocks.1"]]


class Nested(nn.Module):
    """A block whose branch holds a residual of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(W, W, 3, padding=1)
        self.inner = nn.Conv2d(W, W, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.conv(x))
        y = y + self.inner(y)
        return x + y


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.body = nn.Sequential(Nested(), Nested())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.body(self.stem(x))).mean((2, 3))


def test_container_with_nested_residuals_applied_twice():
    model = _converted(Twice())
    assert _units(model) == [["body.0", "body.1", "body.0", "body.1"]]


class NestedInline(nn.Module):
    """``x + g(x + f(x))`` inline: the inner residual is part of the outer unit's branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.f = _branch()
        self.g = _branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = x + self.f(x)
        x = x + self.g(y)
        return x.mean((2, 3))


def test_inline_residual_nested_in_another():
    model = _converted(NestedInline(), same_function=True)
    assert len(_units(model)) == 1


class AddInto(nn.Module):
    """A block that adds into its own input: ``h += f(relu(h)); return h``."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Conv2d(W, W, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h += self.f(torch.relu(h))
        return h


class AddIntoNet(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.blocks = nn.Sequential(*[AddInto() for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


@pytest.mark.parametrize("n", [1, 3])
def test_block_adding_into_its_own_input(n):
    """The unit gets a copy to write: its input is a stream state of the stage."""
    model = _converted(AddIntoNet(n), same_function=n == 1)
    (stage,) = revify.stages(model)
    assert [u.copy_input for u in stage.units] == [True] * n


class InlineAddInto(nn.Module):
    """``x.add_(f(relu(x)))`` inline, and a branch whose first layer is ``ReLU(inplace=True)``: the
    add reads the written input, so the unit is ``U(h) - h`` on a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.f = _branch()
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(W, W, 3, padding=1)
        self.down = nn.Conv2d(W, W, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x.add_(self.f(torch.relu(x)))
        x = self.down(x)
        x = x + self.conv(self.act(x))
        return x.mean((2, 3))


def test_inline_units_writing_their_input():
    model = _converted(InlineAddInto(), same_function=True)
    assert _units(model) == [["InlineAddInto:residual0"], ["InlineAddInto:residual1"]]
    assert [u.copy_input for st in revify.stages(model) for u in st.units] == [True, True]


class ReadAfterWrite(nn.Module):
    """The written input is read again after the block (it sees the block's output there)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.b = nn.Sequential(AddInto())
        self.c = nn.Sequential(Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.b(x)
        return self.c(y + x).mean((2, 3))


def test_unit_whose_written_input_is_read_again_stays_unconverted():
    model = _converted(ReadAfterWrite(), same_function=True)
    assert _units(model) == [["c.0"]]
    (line,) = [r for r in model._revify_plan.report if r.name == "b.0"]
    assert line.kind == "unchanged" and "writes its input in place" in line.detail


class SharedBranch(nn.Module):
    """Two one-unit stages at the root sharing their branch module ``f``, the first with a
    post-add ReLU, then a ResNet-v1 block (``ReLU(inplace=True)`` after its add)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.f = _branch()
        self.down = nn.Conv2d(W, W, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(W, W, 3, stride=2, padding=1)
        self.v1 = V1Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.f(x))
        x = self.down(x)
        x = x + self.f(x)
        x = self.v1(self.down2(x))
        return x.mean((2, 3))


class V1Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(W, W, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv(x))


def test_one_unit_stages_sharing_a_branch_module():
    model = _converted(SharedBranch(), same_function=True)
    assert _units(model) == [["SharedBranch:residual0"], ["f"], ["v1"]]
    assert "forward" not in model.f.__dict__ and "forward" not in model.v1.__dict__


# ---------------------------------------------------------------------------------------------
# 3. Unclear errors and missing validation


class TensorConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.f = _branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.f(x) * torch.tensor(0.5)
        return x.mean((2, 3))


def test_zero_dim_tensor_constant_in_forward():
    model = _converted(TensorConstant(), same_function=True, strict=True)
    assert _units(model) == [["TensorConstant:residual0"]]


class Chain(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.blocks = nn.Sequential(*[Block() for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


@pytest.mark.parametrize("options", [{}, dict(exact=True, alpha=0.5, beta=0.5)])
def test_converted_model_runs_on_meta(options):
    model = revify.convert(Chain(), X.float(), **options)
    model.to("meta")
    x = torch.empty(2, 3, 32, 32, device="meta", requires_grad=True)
    y = model(x)
    assert y.shape == (2, W) and y.is_meta
    y.sum().backward()
    assert x.grad is not None and x.grad.is_meta
    with torch.no_grad():
        assert model(x).shape == (2, W)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_non_finite_coefficients_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        revify.convert(Chain(), X.float(), **{name: value})
    (stage,) = revify.stages(revify.convert(Chain(), X.float()))
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        setattr(stage, name, value)


def test_torchscript_module_is_refused():
    with pytest.raises(TypeError, match="Chain is a TorchScript module; convert the eager"):
        revify.convert(torch.jit.script(Chain()), X.float())


def test_features_collected_by_hooks_are_refused_naming_the_hooks():
    # timm's features_only FeatureHookNet collects stage outputs with forward hooks: tracing ran
    # them on placeholders and convert failed with "'node' not in new_dict during proxy
    # unpickling" and advice about the input shape. The getter form converts.
    hooked = timm.create_model("resnet18", features_only=True, feature_cls="hook")
    with pytest.raises(ConversionError, match=r"body.act1, body.layer1, .* have forward hooks"
                       r".*feature_cls='getter'"):
        revify.convert(hooked, torch.zeros(2, 3, 32, 32))
    getter = timm.create_model("resnet18", features_only=True, feature_cls="getter")
    revify.convert(getter, torch.zeros(2, 3, 32, 32))
    assert len(revify.stages(getter)) == 4
    assert len(getter(torch.randn(2, 3, 32, 32))) == 5


class WriteAfterStage(nn.Module):
    """A stage output written in place by the next layer (``nn.ReLU(inplace=True)``, ``mul_``,
    a Sequential starting with an in-place ReLU), then a strided transition and a stage."""

    def __init__(self, n: int, how: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.a = nn.Sequential(*[Block() for _ in range(n)])
        self.how = how
        self.act = nn.ReLU(inplace=True)
        self.seq = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(W, W, 1))
        self.down = nn.Conv2d(W, W, 3, stride=2, padding=1)
        self.b = nn.Sequential(Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(self.stem(x))
        if self.how == "relu":
            x = self.act(x)
        elif self.how == "mul_":
            x.mul_(2.0)
        else:
            x = self.seq(x)
        x = self.b(self.down(x))
        return self.act(x).mean((2, 3))


@pytest.mark.parametrize("how", ["relu", "mul_", "sequential"])
@pytest.mark.parametrize("n", [1, 2])
def test_in_place_write_on_a_stage_output(n, how):
    """The writing layer gets a clone of the stage output (the stage keeps it for backward)."""
    model = _converted(WriteAfterStage(n, how), same_function=n == 1)
    assert len(revify.stages(model)) == 2


class WriteView(nn.Module):
    """A view of a stage output made before a stage and written after it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.a = nn.Sequential(Block(), Block())
        self.down = nn.Conv2d(W, W, 3, stride=2, padding=1)
        self.b = nn.Sequential(Block(), Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(self.stem(x))
        v = x[:, :2]
        y = self.b(self.down(x))
        v.mul_(2.0)
        return y.mean((2, 3)) + x.mean((2, 3))


def test_in_place_write_into_a_view_from_another_step_is_refused():
    with pytest.raises(ConversionError, match="WriteView.forward: mul_ writes in place into "
                                              "getitem, a view made outside its segment"):
        revify.convert(WriteView(), X.float())


class WriteInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return self.blocks(self.stem(x)).mean((2, 3))


def test_in_place_write_on_the_input_of_a_checkpointed_stem():
    """The recompute of a checkpointed stem wrote its saved input a second time (gradient
    relative error 1.0): it now writes a clone."""
    model = revify.convert(WriteInput().double(), X)
    assert model._revify_plan.segments[0].checkpoint

    def grads(plain: bool) -> list[torch.Tensor]:
        x = X.clone()  # not a leaf requiring grad: the original model writes into it
        with revify.plain_autograd() if plain else torch.enable_grad():
            y = model(x)
        return list(torch.autograd.grad(y.sum(), list(model.parameters())))

    assert max_rel_err(grads(False), grads(True)) < 1e-10


class TorchAdd(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.f = _branch()
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.spelling == "torch.add":
            x = torch.add(x, self.f(x), alpha=0.5)
        elif self.spelling == "method":
            x = x.add(self.f(x), alpha=-0.25)
        else:
            x = torch.add(self.f(x), x, alpha=0.5)
        return x.mean((2, 3))


@pytest.mark.parametrize("spelling", ["torch.add", "method"])
def test_torch_add_with_alpha_is_a_residual(spelling):
    model = _converted(TorchAdd(spelling), same_function=True, strict=True)
    (stage,) = revify.stages(model)
    assert "alpha=" in stage.units[0].pattern


def test_torch_add_scaling_the_skip_is_reported():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        revify.convert(TorchAdd("scaled skip"), X.float())
    (w,) = [w for w in caught if "no chain" in str(w.message)]
    assert "alpha=0.5) scales the skip value" in str(w.message)
    with pytest.raises(ConversionError, match="scales the skip value"):
        revify.convert(TorchAdd("scaled skip"), X.float(), strict=True)


def test_module_replaced_after_conversion_is_differentiated():
    """A unit's submodule replaced after conversion (``block.conv1 = new``, as LoRA or pruning
    tools do) is what the recompute reads and differentiates: the cached slots are refreshed
    (NOTE [ Slot cache ]), so float64 gradients reach the new module's parameters and equal
    plain autograd's."""
    model = timm_model("resnet34").double()
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    step_grads(model, x, plain=False)  # slots cached by a first step
    old = model.layer1[1].conv1
    new = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).double()
    model.layer1[1].conv1 = new
    model.train()
    _, ref = step_grads(model, x, plain=True)
    _, rev = step_grads(model, x, plain=False)
    assert max_rel_err(rev, ref) <= 1e-10
    names = [n for n, _ in model.named_parameters()]
    g = dict(zip(names, rev, strict=False))
    assert g["layer1.1.conv1.weight"] is not None and old.weight.grad is None


def test_structure_changed_after_convert_is_refused_then_reconverts():
    """timm's prune_intermediate_layers after convert left a ViT running all 12 blocks and
    sending gradients to the removed ones (NOTE [ Structure changed after convert ])."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    revify.convert(vit, x)
    vit(x)
    vit.prune_intermediate_layers(indices=[3])
    with pytest.raises(ConversionError, match=r"blocks\.4 is no longer the module converted"):
        vit(x)
    revify.revert(vit)
    revify.convert(vit, x)
    assert [len(st.units) for st in revify.stages(vit)] == [4]
    vit(x).sum().backward()
    # A block replaced by another module: the stage would call the old one.
    model = timm_model("resnet18", num_classes=4)
    revify.convert(model, torch.zeros(2, 3, 32, 32))
    model.layer1[1] = copy.deepcopy(model.layer1[1])
    with pytest.raises(ConversionError, match=r"layer1\.1 is no longer .* \(replaced"):
        model(torch.randn(2, 3, 32, 32))


def test_forward_intermediates_runs_the_stages_without_warning():
    """ViT's forward_intermediates calls its blocks one by one, ResNet's its stage modules:
    both run the converted stages (NOTE [ Intermediates ]); test_taps.py checks the values."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    revify.convert(vit, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vit.forward_intermediates(x, intermediates_only=True)
    assert all("forward" not in m.__dict__ for m in vit.blocks)
    resnet = revify.convert(timm_model("resnet18", num_classes=4), torch.zeros(2, 3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feats = resnet.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == 5


def test_scripting_a_converted_model_is_refused_and_inference_mode_plans_containers():
    model = revify.convert(timm_model("resnet18", num_classes=4), torch.zeros(2, 3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation
        with pytest.raises(TypeError, match="converted ResNet cannot be scripted"):
            torch.jit.script(model)
        with pytest.raises(TypeError, match="converted Sequential cannot be scripted"):
            torch.jit.script(model.layer1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)
    fresh = revify.convert(timm_model("resnet18", num_classes=4), torch.zeros(2, 3, 32, 32))
    with torch.inference_mode():  # the first call of each stage container plans it
        got = fresh.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    revify.revert(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model)  # the unconverted model scripts again


class _AliasedInplace(nn.Module):
    """``y = x; x += f(x)``: eager PyTorch changes ``y`` too, torch.fx records ``x = x + f(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, W, 3, padding=1)
        self.f = nn.Conv2d(W, W, 3, padding=1)
        self.g = nn.Conv2d(W, W, 3, padding=1)
        self.bn = nn.BatchNorm2d(W)
        self.head = nn.Linear(W, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = x
        x += self.f(x)
        x = x + self.bn(self.g(x))
        return self.head((x + y).mean((2, 3)))


def test_a_trace_that_computes_another_function_is_refused():
    """NOTE [ Trace check ]: the trace of the aliased in-place add reads the old value; convert
    refuses it instead of installing another function, and leaves the model as it was."""
    torch.manual_seed(0)
    model = _AliasedInplace().double()
    original = copy.deepcopy(model)
    rng = torch.get_rng_state()
    with pytest.raises(ConversionError, match="another value than the method itself"):
        revify.convert(model, X, strict=True)
    with pytest.warns(UserWarning, match="another value than the method itself"):
        revify.convert(model, X)
    assert not revify.stages(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the check ran on its own generator
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name  # BatchNorm statistics untouched by the check
    torch.testing.assert_close(model(X), original(X), rtol=0, atol=0)


def test_the_same_net_written_out_of_place_converts():
    class OutOfPlace(_AliasedInplace):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            y = x
            x = x + self.f(x)
            x = x + self.bn(self.g(x))
            return self.head((x + y).mean((2, 3)))

    torch.manual_seed(0)
    _converted(OutOfPlace())
