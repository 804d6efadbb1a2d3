"""Checkpoints of converted models say what they compute (NOTE [ Checkpoint record ])."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from conftest import timm_model

import revify

X = torch.zeros(2, 3, 32, 32)


def _saved(state_dict):
    """``state_dict`` through torch.save and torch.load(weights_only=True), as users store it."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _build() -> torch.nn.Module:
    return timm_model("resnet18", num_classes=4, drop_path_rate=0.1)


def _trained(coupling: str) -> torch.nn.Module:
    model = revify.convert(_build(), X, coupling=coupling)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("coupling", ["faithful", "revnet"])
def test_round_trip_converts_as_saved_and_computes_the_same(coupling):
    model = _trained(coupling)
    revify.stages(model)[1].beta = 1 / 2 if coupling == "revnet" else 1 / 8  # e.g. a Schedule
    state = _saved(model.state_dict())
    assert set(state) == set(revify.revert(timm_model("resnet18", num_classes=4)).state_dict())
    fresh = revify.load_state_dict(_build(), state, X)
    assert [(st.name, st.alpha, st.beta, st.exact) for st in revify.stages(fresh)] == [
        (st.name, st.alpha, st.beta, st.exact) for st in revify.stages(model)
    ]
    model.eval()
    fresh.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    # And in training, gradients included.
    model.train()
    fresh.train()
    for m in (model, fresh):
        torch.manual_seed(2)
        m(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_weights_of_another_coupling_warn_when_loaded():
    state = _saved(_trained("revnet").state_dict())
    faithful = revify.convert(_build(), X)
    with pytest.warns(UserWarning, match=r"other coefficients.*layer1 \(saved alpha=0, beta=1"):
        faithful.load_state_dict(state)
    # Weights of an unconverted model (a pretrained checkpoint) load without a word.
    plain = _build().state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        faithful.load_state_dict(plain)
    with pytest.raises(ValueError, match="records no conversion"):
        revify.load_state_dict(_build(), plain, X)


def test_load_refuses_a_model_converted_otherwise_or_another_architecture():
    state = _saved(_trained("revnet").state_dict())
    other = revify.convert(_build(), X)
    with pytest.raises(ValueError, match="already converted with other options"):
        revify.load_state_dict(other, state)
    deeper = timm_model("resnet34", num_classes=4)
    with pytest.raises(ValueError, match="same architecture"):
        revify.load_state_dict(deeper, state, X)
    assert not revify.stages(deeper)  # left as it was given


def test_revert_warns_when_the_coupling_changed_the_function():
    revnet = revify.convert(timm_model("resnet18"), X, coupling="revnet")
    with pytest.warns(UserWarning, match=r"revert: .*layer1 \(alpha=0, beta=1\)"):
        revify.revert(revnet)
    faithful = revify.convert(timm_model("resnet18"), X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revify.revert(faithful)
    # The reverted model's state dict no longer carries a record.
    assert not revify._record.records(faithful.state_dict())
    assert not revify._record.records(revnet.state_dict())


def test_hugging_face_layer_stacks_record_and_round_trip():
    T = pytest.importorskip("transformers")

    def build():
        torch.manual_seed(0)
        return T.GPT2Model(T.GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=2,
                                        n_positions=16, use_cache=False))

    ids = torch.randint(0, 50, (2, 8))
    model = revify.convert(build(), example_input=dict(input_ids=ids), coupling="revnet")
    revify.stages(model)[0].beta = 1 / 2
    state = _saved(model.state_dict())
    (record,) = revify._record.records(state).values()
    assert record["method"] == "stacks" and record["options"]["coupling"] == "revnet"
    fresh = revify.load_state_dict(build(), state, dict(input_ids=ids))
    assert revify.stages(fresh)[0].beta == 1 / 2
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state,
                           fresh(input_ids=ids).last_hidden_state)
