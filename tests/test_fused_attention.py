"""Fused window and semantic attention: same outputs, gradients and weights as MONAI's unfused path."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ENCODER
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import WindowAttention

from dagman_components.weights.encoder_io import build_encoder, trained_model_card
from dagman_components.networks import FusedWindowAttention, SwinDAGMaN, cls_attention, fuse_window_attention


def _windows(seed: int = 0):
    """A window attention, window tokens of 2 images x 8 windows, and a shifted-window mask (0 / -100)."""
    torch.manual_seed(seed)
    attn = WindowAttention(dim=12, num_heads=3, window_size=(4, 4, 4), qkv_bias=True)
    x = torch.randn(16, 64, 12)
    mask = torch.where(torch.rand(8, 64, 64) < 0.2, -100.0, 0.0)
    return attn, x, mask


@pytest.mark.parametrize("shifted", [False, True])
def test_fused_window_attention_equals_monai_with_gradients_fp32(shifted):
    attn, x, mask = _windows()
    mask = mask if shifted else None
    fused = fuse_window_attention(_windows()[0])
    assert type(fused) is FusedWindowAttention
    expected = attn(x, mask)
    got = fused.fused_forward(x, mask)  # the SDPA path itself, with gradients (CUDA's training path)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    expected.square().sum().backward()
    got.square().sum().backward()
    for (name, p), q in zip(attn.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert attn.relative_position_bias_table.grad.abs().sum() > 0  # the bias table does learn through the mask


def test_fused_window_attention_equals_monai_in_bf16():
    attn, x, mask = _windows()
    fused = fuse_window_attention(_windows()[0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = attn(x, mask), fused(x, mask)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.02)


def test_fused_encoder_keeps_weights_outputs_and_s_att():
    torch.manual_seed(0)
    plain = SwinDAGMaN(**TINY_ENCODER)
    torch.manual_seed(0)
    fused = SwinDAGMaN(**TINY_ENCODER, use_flash_attention=True)
    assert sum(type(m) is FusedWindowAttention for m in fused.modules()) == sum(TINY_ENCODER["depths"])
    a, b = plain.state_dict(), fused.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # same keys, same initial values
    x = torch.rand(2, 1, 32, 32, 32)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out_a, out_b = plain(x), fused(x)
        for key in ("cls", "global", "patch_tokens"):
            torch.testing.assert_close(out_b[key], out_a[key], rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(out_b["s_att"], out_a["s_att"], rtol=1e-4, atol=1e-7)
        assert out_b["s_att"].sum(dim=1).sub(1).abs().max() < 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_a, out_b = plain(x), fused(x)
    torch.testing.assert_close(out_b["cls"].float(), out_a["cls"].float(), rtol=0.02, atol=0.03)
    torch.testing.assert_close(out_b["s_att"], out_a["s_att"], rtol=0.02, atol=1e-4)


def test_cls_attention_is_row_zero_of_the_unfused_block():
    torch.manual_seed(0)
    block = SwinDAGMaN(**TINY_ENCODER).sa.blocks[-1]
    x = torch.randn(2, 9, block.attn.qkv.in_features)
    block(x)
    torch.testing.assert_close(cls_attention(block, x), block.attn.att_mat[:, :, 0], rtol=1e-5, atol=1e-7)


def test_fused_encoder_weights_load_into_monai_swin_unetr():
    fused = build_encoder({"network": {"class": "SwinDAGMaN", **TINY_ENCODER}}, use_flash_attention=True)
    unetr = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3),
                      window_size=4)
    swin = {k: v for k, v in fused.state_dict().items() if not k.startswith(("sa.", "mask_token"))}
    report = unetr.swinViT.load_state_dict(swin, strict=True)
    assert not report.missing_keys and not report.unexpected_keys
    # an execution setting: a trained model's card leaves it out, like use_checkpoint
    card = trained_model_card({"class": "SwinDAGMaN", **TINY_ENCODER, "use_flash_attention": True}, None)
    assert "use_flash_attention" not in card["network"]


def test_pretraining_config_passes_the_speed_options_and_its_card_records_them():
    from conftest import REPO
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "dagman_ct_pretraining" / "configs" / "train.yaml"))
    parser.update({"use_flash_attention": True, "compile": True, "embed_dim": 12, "num_heads": [3, 3, 3, 3],
                   "sa_heads": 4, "head_out_dim": 16, "head_hidden_dim": 16, "head_bottleneck_dim": 8})
    card = parser.get_parsed_content("model_card")
    assert card["training"]["use_flash_attention"] is True and card["training"]["compile"] is True
    assert "use_flash_attention" not in card["network"]  # not a weight setting: downstream bundles choose their own
    encoder = parser.get_parsed_content("network_def").encoder
    assert encoder.sa.use_flash_attention and any(type(m) is FusedWindowAttention for m in encoder.modules())
    assert parser["train"]["trainer"]["compile"] == "@compile"
    assert card["training"]["fused_optimizer"] is True and parser.get_parsed_content("optimizer").defaults["fused"]


@pytest.mark.parametrize("bundle, overrides", [
    ("dagman_lung_tumor_ct_segmentation", {"pretrained_encoder": None}),
    ("dagman_lung_nodule_ct_classification", {"pretrained_path": None, "sa_heads": 4}),
])
def test_fine_tuning_configs_pass_the_speed_options(bundle, overrides):
    from conftest import REPO
    from monai.bundle import ConfigParser

    from dagman_components.runtime.compilation import CompiledForward

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.yaml"))
    parser.update({"model_card": None, "use_flash_attention": True, "compile": True, "device": "cpu", "embed_dim": 12,
                   "num_heads": [3, 3, 3, 3], **overrides})
    network = parser.get_parsed_content("network")
    assert sum(type(m) is FusedWindowAttention for m in network.modules()) == 14  # depths 2-2-8-2, the defaults
    assert isinstance(network.__dict__["forward"], CompiledForward)
    assert not any("_orig_mod" in key for key in network.state_dict())
    assert parser.get_parsed_content("optimizer").defaults["fused"] is True  # AdamW's fused kernel by default
    parser["fused_optimizer"] = False
    off = parser.get_parsed_content("optimizer", lazy=False).defaults
    assert not off["fused"] and off["foreach"] is True
