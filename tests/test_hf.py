"""Hugging Face ``transformers`` models: layer stacks run as reversible stages.

Tiny configs (hidden 32, 2 layers, 32 px images or 16 tokens, batch 2) in float64, train mode
(dropout and BatchNorm active), weights perturbed so that no residual branch is trivial.
Gradients are compared with ``revify.plain_autograd()`` of the same converted model, outputs
with the unconverted model.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import max_rel_err

import revify
from revify.check import _branch_ratios

T = pytest.importorskip("transformers")

VISION = dict(image_size=32, num_channels=3)


def _vit():
    return T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, patch_size=8, **VISION))


def _dinov2():
    return T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        mlp_ratio=2, patch_size=8, **VISION))


def _convnext():
    return T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[2, 2], num_stages=2,
                                            layer_scale_init_value=1.0,
                                            **VISION))


def _resnet():
    return T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2],
                                        layer_type="basic"))


def _swin():
    return T.SwinModel(T.SwinConfig(patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                    window_size=4, **VISION))


def _bert():
    return T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=32))


def _gpt2():
    return T.GPT2Model(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                    bos_token_id=0, eos_token_id=0, use_cache=False))


def _llama():
    return T.LlamaModel(T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=64, max_position_embeddings=32,
                                      use_cache=False))


# family -> (builder, whether it reads token ids, reversible units expected)
FAMILIES = {
    "vit": (_vit, False, 2),
    "dinov2": (_dinov2, False, 2),
    "convnext": (_convnext, False, 4),
    "resnet": (_resnet, False, 3),  # encoder.stages.1.layers.0 downsamples
    "swin": (_swin, False, 4),  # blocks return (h, None): sdpa attention keeps no weights
    "bert": (_bert, True, 2),
    "gpt2": (_gpt2, True, 2),
    "llama": (_llama, True, 2),
}


def _tiny(builder, seed: int = 0) -> torch.nn.Module:
    """A float64 model in train mode whose weights are perturbed off HF's init (zero biases,
    unit LayerNorms, std 0.02 weights make thin branches)."""
    torch.manual_seed(seed)
    model = builder().double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(text: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if not text:
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)}
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0  # padding: the attention mask is a side input of every layer
    return {"input_ids": torch.randint(0, 100, (2, 16), generator=g), "attention_mask": mask}


def _step(model, inputs, plain: bool = False):
    """Output and parameter gradients of a fixed loss, RNG seeded and buffers put back."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    if plain:
        with revify.plain_autograd():
            out = model(**inputs).last_hidden_state
    else:
        out = model(**inputs).last_hidden_state
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return out.detach(), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_and_outputs(family):
    builder, text, expected_units = FAMILIES[family]
    model = _tiny(builder)
    original = copy.deepcopy(model)
    inputs = _inputs(text)
    assert revify.convert(model, example_input=inputs) is model
    stages = revify.stages(model)
    assert sum(len(st.units) for st in stages) == expected_units

    with _branch_ratios(model) as ratios:
        out, grads = _step(model, inputs)
    assert min(ratios) > 0.05, ratios  # every branch does something
    assert all(st.last_reconstruction_error is not None for st in stages if len(st.units) > 1)
    ref_out, ref_grads = _step(model, inputs, plain=True)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    scale = max(g.abs().max() for g in ref_grads.values())
    err = max((grads[k] - ref_grads[k]).abs().max() for k in grads) / scale
    assert err <= 1e-10, err
    assert torch.equal(out, ref_out)
    # Every parameter of a unit gets a gradient from the reversible backward.
    unit_params = {id(p) for st in stages for m in st.modules() for p in m.parameters()}
    named = {id(p): n for n, p in model.named_parameters()}
    assert {named[i] for i in unit_params} <= set(grads)

    # The faithful coupling keeps the function: exact for a stage of one unit, within
    # (x_{k-1} - x_k)/64 per unit otherwise (measured: 0.07-1.1 % relative on these models).
    orig_out, _ = _step(original, inputs)
    rel = ((out - orig_out).abs().max() / orig_out.abs().max()).item()
    assert rel < 3e-2, rel
    model.eval()
    original.eval()
    with torch.no_grad():  # the no-grad path computes the same function
        again = model(**inputs).last_hidden_state
        plain_eval = original(**inputs).last_hidden_state
    rel = ((again - plain_eval).abs().max() / plain_eval.abs().max()).item()
    assert rel < 3e-2, rel


def test_default_example_input_and_state_dict():
    for builder in (_vit, _llama):
        model = _tiny(builder)
        keys = list(model.state_dict())
        revify.convert(model)  # zeros of config.image_size / 16 token ids
        assert revify.stages(model)
        assert list(model.state_dict()) == keys
        revify.revert(model)
        assert not revify.stages(model)


def test_revnet_coupling_and_revert_are_exact():
    model = _tiny(_vit)
    original = copy.deepcopy(model).eval()
    inputs = _inputs(False)
    revify.convert(model, example_input=inputs, coupling="revnet")
    out, grads = _step(model, inputs)
    ref_out, ref_grads = _step(model, inputs, plain=True)
    assert torch.allclose(out, ref_out, rtol=0, atol=1e-12)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12)
    revify.revert(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state,
                           original(**inputs).last_hidden_state)


def test_unsupported_families_are_refused_with_reason():
    # ALBERT shares one layer across depth: a unit called twice per forward.
    config = T.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=32)
    with pytest.raises(revify.ConversionError,
                       match=r"AlbertModel.*albert_layers\.0: called 2 times per forward"):
        revify.convert(T.AlbertModel(config))
    # Eager Swin attention returns its weights beside the hidden states.
    config = T.SwinConfig(patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                          window_size=4, attn_implementation="eager", **VISION)
    with pytest.raises(revify.ConversionError,
                       match=r"SwinModel.*blocks\.0: it returns a tuple of more than"):
        revify.convert(T.SwinModel(config))


@pytest.mark.parametrize("builder", [_gpt2, _llama])
def test_kv_cache_is_refused(builder):
    model = _tiny(builder)
    model.config.use_cache = True
    with pytest.raises(revify.ConversionError, match=r"KV cache.*use_cache = False"):
        revify.convert(model)
    model.config.use_cache = False
    revify.convert(model)
    inputs = _inputs(True)
    with pytest.raises(RuntimeError, match="KV cache"):
        model(**inputs, use_cache=True)
    model(**inputs)  # still runs after the refused call


def test_unsupported_calls_raise():
    model = _tiny(_llama)
    revify.convert(model)
    inputs = _inputs(True)
    with pytest.raises(RuntimeError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    h = torch.randn(2, 16, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="out of order"):
        model.layers[1](h)
    # A caller reading the hidden states between layers gets an error, not a wrong value.
    pending = model.layers[0](h, position_embeddings=model.rotary_emb(h, torch.arange(16)[None]))
    with pytest.raises(RuntimeError, match="not materialised"):
        torch.nn.functional.layer_norm(pending, (32,))
    with pytest.raises(RuntimeError, match="not materialised"):
        pending.shape  # noqa: B018


@pytest.mark.parametrize("builder", [_vit, _llama])
def test_output_hidden_states_hands_out_the_stage_states(builder):
    """The layers return the stage's states (NOTE [ Taps ]) to the hidden-state capture:
    float64 gradients through every hidden state equal plain autograd's, and they are the
    states the converted forward computes, one per layer."""
    model = _tiny(builder)
    inputs = _inputs(builder is _llama)
    revify.convert(model, example_input=inputs)
    n = model.config.num_hidden_layers

    def step(plain: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with revify.plain_autograd() if plain else contextlib.nullcontext():
            out = model(**inputs, output_hidden_states=True)
        states = out.hidden_states
        loss = out.last_hidden_state.square().sum()
        loss = loss + sum((h * (i + 1)).sum() for i, h in enumerate(states[:-1]))
        loss.backward()
        return [h.detach() for h in states], [p.grad for p in model.parameters()]

    states, grads = step(plain=False)
    ref_states, ref_grads = step(plain=True)
    assert len(states) == n + 1
    assert all(torch.equal(a, b) for a, b in zip(states, ref_states, strict=True))
    assert max_rel_err(grads, ref_grads) < 1e-10
    # a handed-out state changed between two layers is refused, not run on
    h0 = torch.randn(2, 16 if builder is _llama else 17, 32, dtype=torch.float64)
    first, second = (u.module for u in revify.stages(model)[0].units[:2])
    side = ({"position_embeddings": model.rotary_emb(h0, torch.arange(16)[None])}
            if builder is _llama else {})
    capture = __import__("transformers.utils.output_capturing", fromlist=["x"])
    token = capture._active_collector.set({"hidden_states": []})
    try:
        out = first(h0, **side)
        state = out[0] if isinstance(out, tuple) else out
        state.mul_(2)
        with pytest.raises(RuntimeError, match="out of order"):
            second(state, **side)
    finally:
        capture._active_collector.reset(token)


def test_side_input_requiring_grad_is_refused():
    config = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                          is_decoder=True, add_cross_attention=True, use_cache=False)
    model = T.BertModel(config).double()
    enc = torch.randn(2, 5, 32, dtype=torch.float64)
    ids = torch.randint(0, 100, (2, 16))
    revify.convert(model, example_input=dict(input_ids=ids, encoder_hidden_states=enc))
    with pytest.raises(RuntimeError, match="side input that requires grad"):
        model(input_ids=ids, encoder_hidden_states=enc.requires_grad_())


def test_trainer_trains_a_converted_model(tmp_path):
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                          num_labels=3)
    model = T.BertForSequenceClassification(config)
    revify.convert(model)
    assert sum(len(st.units) for st in revify.stages(model)) == 2
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 100, (16,), generator=g),
         "labels": torch.tensor(i % 3)}
        for i in range(8)
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = T.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True,
    )
    result = T.Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    layer = "bert.encoder.layer.1.output.dense.weight"
    assert not torch.equal(before[layer], dict(model.named_parameters())[layer])


def test_batchnorm_statistics_update_once():
    """HF ResNet layers hold BatchNorm: a reversible step updates running statistics as a
    plain step does, although each unit runs again in backward."""
    model = _tiny(_resnet)
    inputs = _inputs(False)
    revify.convert(model, example_input=inputs)
    start = {k: v.clone() for k, v in model.named_buffers()}
    torch.manual_seed(0)
    model(**inputs).last_hidden_state.sum().backward()
    after = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(start[k])
    torch.manual_seed(0)
    with revify.plain_autograd():
        model(**inputs).last_hidden_state.sum().backward()
    changed = [k for k in start if not torch.equal(start[k], after[k])]
    assert any("stages.0.layers.1" in k for k in changed)
    for k, v in model.named_buffers():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-14)


def test_two_forwards_before_one_backward_keep_their_side_inputs():
    """Each stage forward keeps its own mask for the backward (gradient accumulation in one
    graph): two calls with different masks, one backward, equal plain autograd's gradients."""
    model = _tiny(_llama)
    revify.convert(model)
    a, b = _inputs(True), _inputs(True)
    b["attention_mask"] = torch.ones_like(b["attention_mask"])
    b["attention_mask"][0, 10:] = 0

    def grads(plain: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with revify.plain_autograd() if plain else contextlib.nullcontext():
            loss = model(**a).last_hidden_state.square().sum()
            loss = loss + model(**b).last_hidden_state.sin().sum()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for g, ref in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def test_check_and_audit_refuse_clearly():
    model = _tiny(_vit)
    x = _inputs(False)["pixel_values"]
    with pytest.raises(TypeError, match="revify.audit: ViTModel is a Hugging Face model"):
        revify.audit(model, x)
    revify.convert(model)
    with pytest.raises(TypeError, match="revify.check: ViTModel is a Hugging Face model"):
        revify.check(model, x)


def test_layers_sharded_by_fsdp_are_refused(tmp_path):
    # NOTE [ FSDP2 ]: a stack's recompute would bypass its layers' own FSDP hooks.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        model = _tiny(_gpt2).float()
        inputs = _inputs(True)
        revify.convert(model, example_input=inputs)
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.h:
            fully_shard(layer, mesh=mesh)
        with pytest.raises(RuntimeError, match=r"h\.0, h\.1 of the reversible stage .* sharded"):
            model(**inputs)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_compile_units_on_layer_stacks(family):
    """revify.compile_units on a stack's layers: one graph per layer, no graph break (the
    stack's context is entered outside the compiled code), ordinary autograd's gradients."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    builder, text, _ = FAMILIES[family]
    model = _tiny(builder)
    inputs = _inputs(text)
    revify.convert(model, example_input=inputs)
    revify.compile_units(model, backend="aot_eager")
    for _ in range(2):
        out, grads = _step(model, inputs)
        ref_out, ref = _step(model, inputs, plain=True)
        assert torch.equal(out, ref_out)
        scale = max(g.abs().max() for g in ref.values())
        assert max((grads[k] - ref[k]).abs().max() for k in ref) / scale <= 1e-10
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]
    torch._dynamo.reset()
