"""revify.compile_units: each unit compiled on its own, its recompute the forward's graph.

The reference is ordinary autograd of the same compiled function (``plain_autograd``, whose
units call the same compiled code): inductor draws other dropout numbers than eager, so an
eager model is a reference only without dropout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import InlineNet, max_rel_err, step_grads, timm_model
from torch._dynamo.utils import counters

import revify


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _resnet(drop: float = 0.3, **convert) -> torch.nn.Module:
    model = timm_model("resnet18", num_classes=4, drop_path_rate=drop).double().train()
    return revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64), **convert)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _steps_match_plain(model: torch.nn.Module, x: torch.Tensor, tol: float) -> int:
    """Two steps (DropPath draws per seed, BatchNorm in train mode) whose outputs equal and
    gradients are within ``tol`` of ordinary autograd's; the graphs compiled, the same after
    the second step."""
    for seed in (1, 2):
        y, grads = step_grads(model, x, plain=False, seed=seed)
        y_ref, ref = step_grads(model, x, plain=True, seed=seed)
        assert torch.equal(y, y_ref)
        assert max_rel_err(grads, ref) < tol
        if seed == 1:
            graphs = _graphs()
    assert _graphs() == graphs  # the second step compiled nothing
    return graphs


@pytest.mark.parametrize("coupling", ["faithful", "revnet"])
def test_compiled_units_give_ordinary_autograds_gradients(coupling):
    model = revify.compile_units(_resnet(coupling=coupling), backend="aot_eager")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert _steps_match_plain(model, x, 1e-9) > 0
    assert not counters["graph_break"]  # one graph per unit: revify's checks stay outside


def test_compiled_graph_units_of_an_inline_model():
    # residuals written inline: units run generated code, with direct module calls in eager
    torch.manual_seed(0)
    model = InlineNet().double().train()  # a shared branch module, dropout
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    revify.convert(model, x)
    revify.compile_units(model, backend="aot_eager")
    _, grads = step_grads(model, x, plain=False)
    _, ref = step_grads(model, x, plain=True)
    assert max_rel_err(grads, ref) < 1e-9
    assert _graphs() > 0 and not counters["graph_break"]


def test_compiled_units_compute_the_eager_units_function():
    eager = _resnet(drop=0.0)
    model = revify.compile_units(copy.deepcopy(eager), backend="aot_eager")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y, grads = step_grads(model, x, plain=False)
    y_ref, ref = step_grads(eager, x, plain=False)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-10)
    assert max_rel_err(grads, ref) < 1e-8
    # the graph's BatchNorm updates land in the running statistics once, not again in backward
    # (step_grads put them back)
    for m in (model, eager):
        m(x).square().sum().backward()
    moved = 0
    for (name, a), b in zip(model.named_buffers(), eager.buffers(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name
        moved += name.endswith("running_mean") and not torch.equal(a, torch.zeros_like(a))
    assert moved > 0


def test_compiled_units_under_bf16_autocast_match_ordinary_autograd():
    model = timm_model("resnet18", num_classes=4, drop_path_rate=0.3).train()
    revify.convert(model, torch.zeros(2, 3, 32, 32))
    revify.compile_units(model, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    errors = []
    for plain in (False, True):
        with torch.autocast("cpu", torch.bfloat16):
            errors.append(step_grads(model, x, plain=plain))
    (y, grads), (y_ref, ref) = errors
    assert torch.equal(y, y_ref)
    # bf16 rounding of the recomputed activations (eager revify sits at the same level)
    assert max_rel_err(grads, ref) < 0.05


def test_an_exact_forward_redone_on_a_coarser_grid_counts_batchnorm_once():
    # units adding ~300x their input outgrow the first grid: the stage's forward is redone
    # (NOTE [ Exact streams ]), the compiled graphs' statistics updates put back before the redo
    model = timm_model("resnet18", num_classes=4, drop_path_rate=0.3).double().train()
    with torch.no_grad():
        for block in (model.layer1[0], model.layer1[1]):
            block.bn2.weight.mul_(300.0)
    revify.convert(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    eager = copy.deepcopy(model)
    revify.compile_units(model, backend="aot_eager")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)  # outgrows the first grid
    _, grads = step_grads(model, x, plain=False)
    _, ref = step_grads(model, x, plain=True)
    assert max_rel_err(grads, ref) < 1e-9
    bn = model.layer1[0].bn1
    start = int(bn.num_batches_tracked)
    model(x)
    eager(x)
    assert int(bn.num_batches_tracked) == start + 1
    # equal up to the grids' rounding of x_0: the eager redo keeps the first pass's statistics
    assert torch.allclose(bn.running_var, eager.layer1[0].bn1.running_var, rtol=1e-3, atol=0)


def test_parameter_hooks_fire_once_with_the_true_gradient():
    model = revify.compile_units(_resnet(), backend="aot_eager")
    weight = model.layer1[1].conv2.weight
    seen = []
    handle = weight.register_hook(lambda g: seen.append(g.clone()))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _, grads = step_grads(model, x, plain=False)
    _, ref = step_grads(model, x, plain=True)
    handle.remove()
    assert len(seen) == 2 and torch.allclose(seen[0], seen[1], rtol=1e-9, atol=0)
    assert max_rel_err(grads, ref) < 1e-9


def test_a_change_between_forward_and_backward_raises_naming_the_unit():
    model = revify.compile_units(_resnet(), backend="aot_eager")
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    model.layer1[1].drop_path.drop_prob = 0.5  # dynamo guards on it: another graph
    with pytest.raises(RuntimeError, match=r"layer1\.1.*compiled 1 new graph"):
        out.sum().backward()


def test_a_recompute_that_runs_eagerly_after_a_compiled_forward_raises():
    # the recompile limit reached at the recompute: dynamo runs the unit eagerly, no new graph
    model = revify.compile_units(_resnet(), backend="aot_eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
        model.layer1[1].drop_path.drop_prob = 0.5
        with pytest.raises(RuntimeError, match=r"layer1\.1.*ran eager code .* where its "
                                               r"forward ran a compiled graph"):
            out.sum().backward()


def test_compile_units_refuses_an_unconverted_model():
    with pytest.raises(ValueError, match="revify.convert"):
        revify.compile_units(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.slow
def test_inductor_compiled_units_give_ordinary_autograds_gradients():
    model = timm_model("resnet50", num_classes=4, drop_path_rate=0.3).train()
    revify.convert(model, torch.zeros(2, 3, 32, 32))
    revify.compile_units(model)
    _steps_match_plain(model, torch.randn(2, 3, 32, 32), 1e-5)


def test_a_copy_of_a_compiled_model_compiles_its_own_units():
    # timm's ModelEmaV3 deepcopies the model; torch.save pickles it
    import io
    import pickle

    model = revify.compile_units(_resnet(drop=0.0), backend="aot_eager")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y, grads = step_grads(model, x, plain=False)
    for twin in (copy.deepcopy(model), pickle.load(io.BytesIO(pickle.dumps(model)))):
        units = [u for s in revify.stages(twin) for u in s.units]
        assert all(u.compiled is not None for u in units)
        assert units[0].compiled.fn is not revify.stages(model)[0].units[0].compiled.fn
        y_twin, grads_twin = step_grads(twin, x, plain=False)
        assert torch.equal(y, y_twin)
        assert max_rel_err(grads_twin, grads) == 0.0


def test_check_measures_the_eager_units_and_leaves_them_compiled():
    # the float64 truth is an eager copy: compiled code draws other dropout numbers
    model = revify.compile_units(_resnet().float(), backend="aot_eager")
    graphs = _graphs()
    report = revify.check(model, torch.randn(2, 3, 32, 32))
    assert _graphs() == graphs  # nothing compiled for the check
    assert all(u.compiled is not None for st in revify.stages(model) for u in st.units)
    assert report.ratio < 2
