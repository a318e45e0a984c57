"""Every documented pretraining variant (config override) builds and takes one training step."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigParser

pytestmark = pytest.mark.slow
CONFIGS = REPO / "bundles" / "dagman_ct_pretraining" / "configs"
VARIANTS = sorted(p.stem for p in (CONFIGS / "variants").glob("*.yaml"))
TINY = {"roi_size": [32, 32, 32], "embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "sa_heads": 3,
        "head_out_dim": 32, "head_hidden_dim": 16, "head_bottleneck_dim": 8, "max_epochs": 2,
        "vit_hidden_size": 24, "vit_depth": 2, "vit_heads": 3, "vit_patch_size": 8}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_takes_a_step(variant, tmp_path):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "demo.yaml"), str(CONFIGS / "variants" / f"{variant}.yaml")])
    parser.update({**TINY, "bundle_root": str(tmp_path)})
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(1, 1, 32, 32, 32, generator=g), "image_2": torch.rand(1, 1, 32, 32, 32, generator=g)}
    parser["train#dataloader"] = "$[" + repr(0) + "]"  # length 1: the step below feeds the batch itself
    trainer = parser.get_parsed_content("train#trainer")
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.state.epoch, trainer.state.iteration = 2, 2  # past the frozen-prototype epoch
    before = {k: v.clone() for k, v in parser.get_parsed_content("network").state_dict().items()}
    out = trainer._iteration(trainer, batch)
    scalars = out["scalars"]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in scalars.items() if k.startswith("loss"))
    weights = parser["loss_weights"]
    expected = sum(weights[k] * scalars[f"loss_{k}"] for k in weights)
    assert scalars["loss"] == pytest.approx(expected, rel=1e-5)
    encoder = parser.get_parsed_content("network").encoder
    cells = (32 // encoder.sa_stride) ** 3
    counts = {"attention_hint": round(0.7 * cells) - round(0.07 * cells)}
    assert scalars["masked_fraction"] == pytest.approx(counts.get(parser["masking_strategy"], round(0.7 * cells)) / cells)
    after = parser.get_parsed_content("network").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student learned
