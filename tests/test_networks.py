"""Swin-DAGMaN encoder, heads and the pretraining wrapper."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ENCODER
from monai.networks.nets import SwinUNETR

from dagman_components.networks import DAGMaNPretrainNetwork, ProjectionHead, ReconstructionHead, SwinDAGMaN, make_teacher


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SwinDAGMaN(**TINY_ENCODER).eval()


def test_output_shapes_and_attention(encoder):
    out = encoder(torch.rand(2, 1, 64, 64, 32))
    # SA at stage 3: width 12 * 8 = 96 on a 64/16 x 64/16 x 32/16 grid
    assert out["cls"].shape == (2, 96)
    assert out["patch_tokens"].shape == (2, 4 * 4 * 2, 96)
    assert out["s_att"].shape == (2, 32)
    assert torch.allclose(out["s_att"].sum(-1), torch.ones(2), atol=1e-6)
    assert (out["s_att"] >= 0).all()
    assert out["sa_grid"].tolist() == [4, 4, 2]
    assert [f.shape[1] for f in out["features"]] == [12, 24, 48, 96, 192]
    assert out["features"][-1].shape[2:] == (2, 2, 1)
    assert out["global"].shape == (2, 192)
    assert torch.allclose(out["global"], out["features"][-1].mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("stage,grid", [(1, 8), (2, 4), (4, 1)])
def test_sa_stage_is_configurable(stage, grid):
    enc = SwinDAGMaN(**{**TINY_ENCODER, "sa_stage": stage, "sa_heads": 3})
    out = enc(torch.rand(1, 1, 32, 32, 32))
    assert out["s_att"].shape == (1, grid**3)
    assert enc.sa_stride == 2 * 2**stage
    assert enc.sa_dim == 12 * 2**stage


def test_full_mask_hides_the_image(encoder):
    a, b = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    full = torch.ones(1, 16, 16, 16)
    with torch.no_grad():
        ya, yb = encoder(a, mask=full)["cls"], encoder(b, mask=full)["cls"]
        yc = encoder(a)["cls"]
    assert torch.allclose(ya, yb, atol=1e-5)  # every token replaced by the mask token
    assert not torch.allclose(ya, yc, atol=1e-3)


def test_token_drop_equals_zero_tokens(encoder):
    x = torch.rand(1, 1, 32, 32, 32)
    drop = torch.zeros(1, 16, 16, 16)
    drop[0, :8] = 1
    with torch.no_grad():
        y = encoder(x, token_drop=drop)["cls"]
        y0 = encoder(x)["cls"]
    assert not torch.allclose(y, y0)
    # the mask token is zero-initialised, so masking and dropping are the same at initialisation
    with torch.no_grad():
        ym = encoder(x, mask=drop)["cls"]
    assert torch.allclose(y, ym, atol=1e-6)


def test_bad_inputs_raise_clear_errors(encoder):
    with pytest.raises(ValueError, match="divisible by 32"):
        encoder(torch.rand(1, 1, 48, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        encoder(torch.rand(1, 32, 32, 32))
    with pytest.raises(ValueError, match="in_channels=1"):
        encoder(torch.rand(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="sa_stage"):
        SwinDAGMaN(**{**TINY_ENCODER, "sa_stage": 5})


def test_swin_keys_match_swinunetr():
    enc = SwinDAGMaN(**TINY_ENCODER)
    seg = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3),
                    window_size=4)
    swin_keys = set(seg.swinViT.state_dict())
    own = set(enc.state_dict())
    assert swin_keys <= own
    assert {k.split(".")[0] for k in own - swin_keys} == {"mask_token", "sa"}


def test_projection_head_prototypes_frozen_norm():
    head = ProjectionHead(96, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    assert head(torch.rand(3, 5, 96)).shape == (3, 5, 50)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    assert len(head.last_layer_parameters()) == 1


def test_reconstruction_head_restores_input_size():
    head = ReconstructionHead(192, stride=32, out_channels=1)
    assert head(torch.rand(2, 192, 2, 1, 1)).shape == (2, 1, 64, 32, 32)


def test_teacher_is_a_frozen_copy_without_reconstruction():
    student = DAGMaNPretrainNetwork(SwinDAGMaN(**TINY_ENCODER), out_dim=32, hidden_dim=16, bottleneck_dim=8)
    teacher = make_teacher(student)
    assert teacher.recon_head is None and student.recon_head is not None
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    s, t = student.state_dict(), teacher.state_dict()
    assert set(t) == {k for k in s if not k.startswith("recon_head.")}
    assert all(torch.equal(t[k], s[k]) for k in t)
    mask = torch.zeros(2, 16, 16, 16)
    mask[:, :8] = 1
    out = student(torch.rand(2, 1, 32, 32, 32), mask=mask)
    assert out["recon"].shape == (2, 1, 32, 32, 32)
    assert out["patch_logits"].shape == (2, 8, 32)
    # every trainable parameter receives a gradient (DDP needs it)
    (out["recon"].mean() + out["cls_logits"].mean() + out["patch_logits"].mean() + out["global_logits"].mean()).backward()
    assert [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None] == []


def test_plain_swin_baseline_without_sa():
    from dagman_components.networks import MaskedReconstructionNetwork

    enc = SwinDAGMaN(**{**TINY_ENCODER, "sa_stage": None})
    assert enc.sa is None and enc.sa_stride == 16
    out = enc(torch.rand(1, 1, 32, 32, 32))
    assert "s_att" not in out and out["global"].shape == (1, 192)
    net = MaskedReconstructionNetwork(enc)
    assert net(torch.rand(2, 1, 32, 32, 32), mask=torch.ones(2, 16, 16, 16)).shape == (2, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="sa_stage=None"):
        MaskedReconstructionNetwork(SwinDAGMaN(**TINY_ENCODER))


def test_empty_fill_makes_a_dropped_token_equal_an_empty_patch():
    """token_drop_fill="empty": a dropped token becomes the embedding of an all-zero patch (empty tissue), so dropping
    carries no more signal than an empty region does; "zero" (the paper's reading) leaves it at 0."""
    torch.manual_seed(0)
    empty = SwinDAGMaN(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), sa_heads=4, token_drop_fill="empty")
    zero = SwinDAGMaN(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), sa_heads=4)
    zero.load_state_dict(empty.state_dict())
    x = torch.rand(1, 1, 32, 32, 32)
    x[..., :2, :2, :2] = 0.0  # patch (0, 0, 0) is empty tissue
    drop = torch.zeros(1, 16, 16, 16)
    drop[0, 5, 5, 5] = 1.0
    captured = {}
    for name, net in (("empty", empty), ("zero", zero)):
        handle = net.pos_drop.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.detach()))
        net.eval()(x, token_drop=drop)
        handle.remove()
    tokens = captured["empty"][0]
    assert torch.allclose(tokens[:, 5, 5, 5], tokens[:, 0, 0, 0], atol=1e-6)  # dropped == empty patch
    assert torch.allclose(tokens[:, 5, 5, 5], empty.patch_embed.proj.bias, atol=1e-6)  # the conv's bias
    assert torch.count_nonzero(captured["zero"][0][:, 5, 5, 5]) == 0
    assert torch.equal(captured["zero"][0][:, 4, 4, 4], tokens[:, 4, 4, 4])  # tokens kept are the same
    with pytest.raises(ValueError, match="token_drop_fill"):
        SwinDAGMaN(embed_dim=12, num_heads=(3, 3, 3, 3), token_drop_fill="noise")


def test_dino_init_of_the_semantic_attention_blocks():
    torch.manual_seed(0)
    net = SwinDAGMaN(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), sa_heads=4, sa_init="dino")
    qkv = net.sa.blocks[0].attn.qkv
    assert 0.018 < float(qkv.weight.std()) < 0.022  # normal 0.02 (truncated at +/-2, as DINO and timm do)
    assert torch.count_nonzero(qkv.bias) == 0 and torch.all(net.sa.blocks[1].norm1.weight == 1)
    default = SwinDAGMaN(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), sa_heads=4)
    assert float(default.sa.blocks[0].attn.qkv.weight.std()) > 0.04  # PyTorch's default is wider at width 96
    assert set(net.state_dict()) == set(default.state_dict())
    with pytest.raises(ValueError, match="sa_init"):
        SwinDAGMaN(embed_dim=12, num_heads=(3, 3, 3, 3), sa_init="xavier")


@pytest.mark.parametrize("fused", [False, True])
def test_sa_head_width_option(fused):
    settings = dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), sa_stage=2, sa_heads=4)
    torch.manual_seed(0)
    wide = SwinDAGMaN(**settings, sa_head_dim=48, use_flash_attention=fused).eval()
    default = SwinDAGMaN(**settings)
    attn = wide.sa.blocks[1].attn
    assert attn.num_heads == 4 and attn.dim_head == 48
    assert tuple(attn.qkv.weight.shape) == (3 * 4 * 48, 48)  # SA width 48 at stage 2; 4 heads of 48
    assert tuple(attn.out_proj.weight.shape) == (48, 4 * 48)
    assert default.sa.blocks[1].attn.dim_head == 12  # 48 / 4
    assert set(wide.state_dict()) == set(default.state_dict())  # same names, other shapes
    out = wide(torch.rand(2, 1, 32, 32, 32))
    assert out["s_att"].shape == (2, 64) and torch.allclose(out["s_att"].sum(-1), torch.ones(2))
    if fused:  # the explicit [CLS] row of a fused block equals the unfused block's probabilities
        unfused = SwinDAGMaN(**settings, sa_head_dim=48).eval()
        unfused.load_state_dict(wide.state_dict())
        x = torch.rand(2, 1, 32, 32, 32)
        torch.testing.assert_close(unfused(x)["s_att"], wide(x)["s_att"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="sa_head_dim"):
        SwinDAGMaN(**settings, sa_head_dim=0)
