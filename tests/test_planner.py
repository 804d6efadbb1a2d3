"""The memory planner: treatments as data, the fastest plan under a budget, "will it fit?"."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import timm_model

import revify
from revify import planner
from revify.cli import main
from revify.convert import plans

SHAPE = (3, 128, 128)
BATCH = 16


@pytest.fixture(scope="module")
def resnet():
    return timm_model("resnet18", num_classes=5)


@pytest.fixture(scope="module")
def measured(resnet):
    """A planner over a converted copy: the uniform measurements and the composed mixes."""
    converted = revify.convert(timm_model("resnet18", num_classes=5), torch.zeros(2, *SHAPE))
    return planner._Planner(converted, (BATCH, *SHAPE), torch.float32, torch.device("cpu"))


def test_memory_plan_round_trips_and_prints() -> None:
    mp = revify.MemoryPlan({"stem": "store", "layer1": "checkpoint:1"}, budget_bytes=10,
                           peak_bytes=9, time_s=0.5, input_shape=(2, 3, 8, 8), device="cpu",
                           baselines={"plain": {"peak_bytes": 20, "time_s": 0.2}})
    back = revify.MemoryPlan.from_json(mp.to_json())
    assert back == mp
    text = str(mp)
    assert "layer1" in text and "checkpoint:1" in text and "plain" in text
    with pytest.raises(ValueError, match="treatments"):
        revify.MemoryPlan.from_dict({"budget_bytes": 3})


@pytest.mark.parametrize("text, expected", [
    ("12GiB", 12 * 2**30), ("800 MB", 800 * 10**6), ("1.5KiB", 1536), (4096, 4096),
])
def test_budget_strings(text, expected) -> None:
    assert planner.parse_budget(text) == expected


def test_budget_fraction_and_bad_budgets() -> None:
    assert planner.parse_budget(0.5, plain_peak=1000) == 500
    for bad in ("12 parsecs", "-3GB", 0, 1.5, "", -1):
        with pytest.raises(ValueError):
            planner.parse_budget(bad, plain_peak=1000)
    with pytest.raises(TypeError):
        planner.parse_budget(True)


def test_composed_peaks_follow_the_simulation(measured) -> None:
    """Every uniform plan is composed from its own measurement exactly; random mixes stay
    within 15 % of their simulated peak (the choice is then verified by simulation)."""
    p = measured
    for key, m in p.measured.items():
        index = tuple(t.options.index(p.uniform[key].get(t.name, "store")) for t in p.terms)
        if key != "checkpoint":  # its segments' terms come from the reversible measurement
            assert p.peaks[index] == pytest.approx(m.peak, rel=1e-9)
        assert p.times[index] == pytest.approx(m.time_s, rel=0.05)
    rng = random.Random(0)
    for _ in range(6):
        index = tuple(rng.randrange(len(t.options)) for t in p.terms)
        sim = p.simulate(p.treatments(index))
        assert p.peaks[index] == pytest.approx(sim.peak, rel=0.15)


def test_chosen_plan_fits_and_beats_every_uniform_plan(measured) -> None:
    p = measured
    low = min(m.peak for m in p.measured.values()) + p.persistent
    high = p.measured["store"].peak + p.persistent
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        budget = int(low + frac * (high - low))
        chosen, sim = p.choose(budget)
        assert sim.peak + p.persistent <= budget
        # independently: the audit of a model converted with that plan
        check = revify.convert(timm_model("resnet18", num_classes=5), torch.zeros(2, *SHAPE),
                               plan=chosen)
        report = revify.audit(check, (BATCH, *SHAPE))
        assert report.peak_bytes == sim.peak + p.persistent
        assert report.treatments == {**report.treatments, **chosen}
        for m in p.measured.values():
            if m.peak + p.persistent <= budget:
                assert sim.time_s <= m.time_s * (1 + 1e-9)


def test_infeasible_budget_names_the_least_peak(measured) -> None:
    with pytest.raises(ValueError, match="smallest training peak revify reaches is"):
        measured.choose(measured.persistent + 1)


def test_plan_memory_reports_baselines(resnet) -> None:
    mp = revify.plan_memory(resnet, SHAPE, BATCH, memory_budget=0.85)
    base = mp.baselines
    assert set(base) == {"plain", "timm-ckpt", "minimum"}
    assert mp.budget_bytes == int(0.85 * base["plain"]["peak_bytes"])
    assert base["minimum"]["peak_bytes"] <= mp.peak_bytes <= mp.budget_bytes
    assert mp.input_shape == (BATCH, *SHAPE)
    assert not plans(resnet)  # planned on a copy
    model = revify.convert(timm_model("resnet18", num_classes=5), torch.zeros(2, *SHAPE),
                           plan=revify.MemoryPlan.from_json(mp.to_json()))
    assert revify.memory_plan(model) == mp  # with its predictions
    first = revify.stages(model)[0]
    first.treatment = "store" if first.treatment != "store" else "reversible"  # by hand:
    assert revify.memory_plan(model).peak_bytes is None  # the predictions no longer hold


def test_convert_with_a_budget_installs_the_plan() -> None:
    model = timm_model("resnet18", num_classes=5)
    x = torch.zeros(BATCH, *SHAPE)
    plain = revify.audit(model, x).peak_bytes_before
    revify.convert(model, x, memory_budget=int(0.85 * plain))
    mp = revify.memory_plan(model)
    assert mp.budget_bytes == int(0.85 * plain) and mp.peak_bytes <= mp.budget_bytes
    assert revify.audit(model, x).peak_bytes == mp.peak_bytes
    by_step = {name: t for name, t in mp.treatments.items()}
    stages = {st.name: st.treatment for st in revify.stages(model)}
    assert all(by_step[name] == t for name, t in stages.items())


def test_mixed_plan_gradients_match_plain_autograd() -> None:
    torch.manual_seed(0)
    model = timm_model("resnet18", num_classes=5, drop_path_rate=0.1).double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plan = {"stem": "store", "layer1": "checkpoint:1", "layer1 -> layer2": "checkpoint",
            "layer2": "store", "layer3": "checkpoint", "layer4": "reversible"}
    revify.convert(model, x, plan=plan)
    assert {k: revify.memory_plan(model).treatments[k] for k in plan} == plan

    def grads(plain: bool):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        if plain:
            with revify.plain_autograd():
                y = model(xi)
        else:
            y = model(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        out = [y.detach(), xi.grad] + [p.grad.clone() for p in model.parameters()]
        buffers = [b.clone() for b in model.buffers()]
        model.load_state_dict(state)
        return out, buffers

    (got, got_buf), (ref, ref_buf) = grads(False), grads(True)
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max().clamp_min(1)
    for a, b in zip(got_buf, ref_buf, strict=True):
        assert torch.equal(a, b)  # running statistics updated once, as plain autograd does


def test_bad_plans_leave_the_model_unconverted() -> None:
    x = torch.zeros(2, *SHAPE)
    for plan, match in (({"layer9": "store"}, "layer9"), ({"layer1": "sideways"}, "sideways"),
                        ({"tail": "checkpoint"}, "tail"), ({"stem": "reversible"}, "stem")):
        model = timm_model("resnet18", num_classes=5)
        with pytest.raises(ValueError, match=match):
            revify.convert(model, x, plan=plan)
        assert not plans(model) and not revify.stages(model)
    with pytest.raises(ValueError, match="not both"):
        revify.convert(timm_model("resnet18"), x, plan={}, memory_budget="1GiB")
    with pytest.raises(ValueError, match="example_input"):
        revify.convert(timm_model("resnet18"), memory_budget="1GiB")  # which batch?


def test_fit_finds_more_batch_for_revify(resnet) -> None:
    rows = revify.fit(resnet, (3, 32, 32), "600MiB", verify=True)
    by = {r.method: r for r in rows}
    assert set(by) == {"plain", "timm-ckpt", "revify"}
    for r in rows:
        assert 0 < r.peak_bytes <= 600 * 2**20 and r.batch_size > 0 and r.time_s > 0
    assert by["revify"].batch_size > by["timm-ckpt"].batch_size > by["plain"].batch_size
    # the next batch would not fit: the answer is the largest
    m = revify.fit(resnet, (3, 32, 32), by["plain"].peak_bytes, verify=True)[0]
    assert m.batch_size <= by["plain"].batch_size


def test_tradeoff_curve_and_its_plot(resnet, tmp_path) -> None:
    mp = revify.plan_memory(resnet, SHAPE, BATCH, memory_budget=0.9, tradeoff_points=3)
    assert len(mp.tradeoff) == 3
    for point in mp.tradeoff:
        assert point["peak_bytes"] <= point["budget_bytes"]
    times = [p["time_s"] for p in sorted(mp.tradeoff, key=lambda p: p["budget_bytes"])]
    assert times[-1] <= times[0]  # more memory never buys a slower plan
    assert revify.MemoryPlan.from_json(mp.to_json()).tradeoff == mp.tradeoff
    path = tmp_path / "audit.png"
    assert main(["audit", "resnet18", "--batch-size", str(BATCH), "--img-size", "128",
                 "--budget", "0.9", "--plot", str(path)]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_cli_fit_and_budget_json(capsys) -> None:
    assert main(["fit", "resnet18", "--memory", "600MiB", "--img-size", "32", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in data["rows"]] == ["plain", "timm-ckpt", "revify"]
    assert main(["audit", "resnet18", "--batch-size", str(BATCH), "--img-size", "128",
                 "--budget", "0.85", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["treatments"]["layer1"] in planner.options_of(
        revify.stages(revify.convert(timm_model("resnet18"), torch.zeros(2, *SHAPE)))[0])
    assert main(["fit", "resnet18", "--memory", "lots"]) == 2
    assert "cannot read memory_budget" in capsys.readouterr().err
