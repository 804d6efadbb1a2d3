"""Converting a model built on the meta device (NOTE [ Meta constants ] in revify/_trace.py).

Swin's relative position index, BEiT's and EVA's rotary embeddings are buffers the traced code
reads at trace time; on meta they are placeholders. A model converted on meta, then
materialised (``to_empty``, weights and non-persistent buffers initialised), must compute what
the same model converted on the CPU computes, with the same gradients.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import max_rel_err, step_grads
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import nn

import revify
from revify import ConversionError

F64 = torch.float64

SMALL = {
    "swin_tiny_patch4_window7_224": dict(
        img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
        drop_path_rate=0.3,
    ),
    "beit_base_patch16_224": dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.3,
    ),
    "eva02_tiny_patch14_224": dict(img_size=28, embed_dim=32, depth=2, num_heads=2),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("name", list(SMALL))
def test_meta_built_model_converts_and_trains_after_materialising(name):
    kwargs = SMALL[name]
    with torch.device("meta"):
        meta = timm.create_model(name, num_classes=4, **kwargs)
    revify.convert(meta, strict=True)
    torch.manual_seed(0)
    cpu = timm.create_model(name, num_classes=4, **kwargs).double()
    revify.convert(cpu, torch.zeros(2, 3, kwargs["img_size"], kwargs["img_size"], dtype=F64))
    units = [[u.name for u in st.units] for st in revify.stages(cpu)]
    assert units and [[u.name for u in st.units] for st in revify.stages(meta)] == units

    meta.to_empty(device="cpu")
    meta.init_weights()
    reinit_non_persistent_buffers(meta)  # garbage after to_empty: timm recomputes them
    meta.double()
    meta.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], dtype=F64)
    y_cpu, g_cpu = step_grads(cpu.train(), x, plain=False)
    y_ref, g_ref = step_grads(meta.train(), x, plain=True)
    y, g = step_grads(meta, x, plain=False)
    assert torch.equal(y, y_ref)
    assert max_rel_err(g, g_ref) < 1e-10
    assert torch.allclose(y, y_cpu, rtol=0, atol=1e-12) and max_rel_err(g, g_cpu) < 1e-10

    opt = torch.optim.SGD(meta.parameters(), lr=0.1)
    meta(x.float().double()).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in meta.parameters())


class _PlainAttribute(nn.Module):
    """A residual scaled by a plain tensor attribute (no buffer): read at trace time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.gain = torch.ones(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) * self.gain.view(1, -1, 1, 1)


def test_meta_constant_from_no_buffer_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), _PlainAttribute(), _PlainAttribute())
    with pytest.raises(ConversionError, match="placeholders"):
        revify.convert(model, torch.zeros(2, 3, 8, 8, device="meta"), strict=True)
    assert not revify.stages(model)
