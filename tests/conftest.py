"""Tiny diffusers denoisers so that the suite stays fast; the shipped zoo is exercised by slow tests
and by the benchmarks."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from diffquant.models import ModelMeta, make_scheduler

# One intra-op thread: the tiny models gain nothing from more, and on a machine whose cores are busy
# (CI neighbours, a benchmark) a second spinning thread made single tests take minutes instead of
# seconds. The kernels' multi-threaded split is tested on its own (tests/kernels, `threads`).
torch.set_num_threads(1)


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    m = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    num_class_embeds=11, norm_num_groups=4, attention_head_dim=8).eval()
    m.dq_meta = ModelMeta(name="tiny-unet", space_to_depth=2, image_size=16)
    return m


@pytest.fixture
def tiny_dit():
    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=2,
                              sample_size=16, patch_size=4, num_embeds_ada_norm=10).eval()
    m.dq_meta = ModelMeta(name="tiny-dit", image_size=16)
    return m


@pytest.fixture
def scheduler():
    return make_scheduler()
