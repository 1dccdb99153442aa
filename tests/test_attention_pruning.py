"""statprune through multi-head attention (timm ViT/DeiT): heads and head dims stay consistent,
the attention's num_heads/head_dim follow, and the artifact reloads with identical outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import netshrink as ns

timm = pytest.importorskip("timm")

pytestmark = [pytest.mark.timm, pytest.mark.usefixtures("single_thread")]

SIDE = 32


def _data() -> ns.DataSplits:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> ns.ArrayDataset:
        images = torch.randint(0, 256, (n, 3, SIDE, SIDE), dtype=torch.uint8, generator=gen)
        return ns.ArrayDataset(images, torch.arange(n) % 10, mean=0.5, std=0.25)

    return ns.DataSplits(name="random32", train=split(16), val=split(8), test=split(8),
                         num_classes=10, extra={"input_shape": (3, SIDE, SIDE)})


def _attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Attention"]


def _consistent(model: nn.Module) -> None:
    for attn in _attentions(model):
        width = attn.num_heads * attn.head_dim
        assert attn.qkv.out_features == 3 * width
        assert attn.proj.in_features == width == attn.attn_dim
        assert attn.scale == pytest.approx(attn.head_dim ** -0.5)


def _compress(spec: str, tmp_path, **config):
    data = _data()
    model = ns.load_model(spec, **data.model_options())
    before = [(a.num_heads, a.head_dim) for a in _attentions(model)]
    result = ns.compress(model, [ns.step("statprune", **config)], data=data, seed=0,
                         latency=False)
    pruned = result.model.eval()
    x, _ = data.batch("test", 4)
    with torch.no_grad():
        expected = pruned(x)
    loaded = ns.load(result.save(tmp_path / "vit.nsa", report=False)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert [(a.num_heads, a.head_dim) for a in _attentions(loaded)] == \
        [(a.num_heads, a.head_dim) for a in _attentions(pruned)]
    return result, before, x, expected


@pytest.mark.parametrize("spec", [f"timm:deit_tiny_patch16_224?input_size={SIDE}",
                                  f"timm:vit_tiny_patch16_224?input_size={SIDE}"])
def test_head_dims_pruned_alike_in_every_head(spec, tmp_path):
    result, before, x, expected = _compress(spec, tmp_path)
    model = result.model
    assert result.report.params_after < result.report.params_before
    _consistent(model)
    after = [(a.num_heads, a.head_dim) for a in _attentions(model)]
    assert [h for h, _ in after] == [h for h, _ in before]  # heads kept
    assert any(d < d0 for (_, d), (_, d0) in zip(after, before))
    details = {r.name: r.details for r in result.records}
    qkv = details["blocks.0.attn.qkv"]
    assert qkv["channels_before"] == 192 and qkv["heads_before"] == 3
    assert qkv["head_dim_after"] == model.blocks[0].attn.head_dim
    # the manual (unfused) attention path agrees with the fused one: scale followed head_dim
    unfused = copy.deepcopy(model)
    for attn in _attentions(unfused):
        attn.fused_attn = False
    with torch.no_grad():
        assert torch.allclose(unfused(x), expected, atol=1e-5)


def test_whole_heads(tmp_path):
    result, before, _, _ = _compress(f"timm:deit_tiny_patch16_224?input_size={SIDE}", tmp_path,
                                     attention="heads")
    _consistent(result.model)
    after = [(a.num_heads, a.head_dim) for a in _attentions(result.model)]
    assert all(d == 64 and 1 <= h <= 3 for h, d in after)
    assert sum(h for h, _ in after) < sum(h for h, _ in before)


def test_skip_leaves_attention_widths(tmp_path):
    result, before, _, _ = _compress(f"timm:deit_tiny_patch16_224?input_size={SIDE}", tmp_path,
                                     attention="skip")
    assert [(a.num_heads, a.head_dim) for a in _attentions(result.model)] == before
    details = {r.name: r.details for r in result.records}
    assert "attention='skip'" in details["blocks.0.attn.qkv"]["skipped"]
    assert result.model.blocks[0].mlp.fc1.out_features < 768  # the rest is still pruned


# -- attention netshrink cannot prune is refused per layer ---------------------------------------


class Tokens(nn.Module):
    """Patchify, one attention block, mean-pool, classify (``attn`` is built by the caller)."""

    def __init__(self, attn: nn.Module, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.attn = attn
        self.fc1 = nn.Linear(dim, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        return self.head(torch.relu(self.fc1(x.mean(1))))


class Unrecognised(nn.Module):
    """Fused q/k/v under another name and without ``num_heads``: netshrink cannot tell heads."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.h = heads

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4) \
            .unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def _statprune_toy(attn: nn.Module) -> dict[str, dict]:
    from netshrink import CompressionContext, LayerSelector, ModelInfo
    from netshrink.plugins.statprune import StatPrune

    torch.manual_seed(0)
    model = Tokens(attn)
    info = ModelInfo("toy", input_shape=(3, 16, 16), num_classes=10, head="head")
    ctx = CompressionContext(info=info, seed=0, step_name="statprune")
    layers = LayerSelector(types=["Linear"]).resolve(model, head="head")
    out = StatPrune({"coupled": "skip"}).compress(model, layers, ctx)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))  # still runs
    return {r.name: r.details for r in out.records}


@pytest.mark.parametrize("attn, layer, reason", [
    (Unrecognised(), "attn.to_qkv", "torch.unbind"),
    (timm.layers.Attention(32, num_heads=4, qk_norm=True, norm_layer=nn.LayerNorm), "attn.qkv",
     "q_norm"),
])
def test_attention_that_cannot_be_pruned_is_refused_per_layer(attn, layer, reason):
    details = _statprune_toy(attn)
    assert reason in details[layer]["skipped"]
    assert details["fc1"].get("removed", 0) > 0  # other layers are still pruned
