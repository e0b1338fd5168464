"""The shipped feature network and the metrics computed with it on real data."""

import pytest
import torch

from diffquant.data import feature_split, load_mnist
from diffquant.metrics.evaluate import evaluate, real_features
from diffquant.metrics.features import CHECKPOINT, accuracy, load_feature_net
from diffquant.metrics.fid import fid_from_features
from diffquant.metrics.inception import FIDInceptionV3, load_extractor

pytestmark = pytest.mark.skipif(not CHECKPOINT.exists(), reason="feature network not trained yet")


def test_held_out_accuracy_at_least_98_percent():
    _, test = feature_split(load_mnist())
    net = load_feature_net().net
    assert accuracy(net, test.images, test.labels) >= 0.98


def test_fid_of_real_halves_is_small_and_of_noise_is_huge():
    ext = load_feature_net()
    data = load_mnist()
    feats = real_features(ext)["pool"]
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    halves = fid_from_features(feats[perm[:2500]], feats[perm[2500:]])
    noise = fid_from_features(feats, ext(torch.rand(2000, 1, 32, 32) * 2 - 1)["pool"])
    assert halves * 50 < noise


def test_real_images_score_as_real():
    data = load_mnist()
    idx = torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:1000]
    imgs = ((data.images[idx] + 1) * 127.5).round().to(torch.uint8).numpy()
    m = evaluate(imgs, data.labels[idx], ref_images=imgs)
    assert m["class_accuracy"] > 0.97 and m["fid_to_fp"] == pytest.approx(0, abs=1e-6)
    assert m["is"] > 7  # the feature net's label smoothing caps its confidence below 10
    assert m["fid"] < 3 and m["precision"] > 0.8 and m["recall"] > 0.8


def test_inception_layout_can_be_swapped_in(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    torch.save(net.state_dict(), tmp_path / "incep.pth")
    ext = load_extractor(f"inception:{tmp_path / 'incep.pth'}")
    imgs = torch.rand(3, 1, 32, 32) * 2 - 1
    out = ext(imgs)
    assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
    assert out["spatial"].shape == (3, 7 * 17 * 17)
    m = evaluate(imgs, torch.arange(3), ref_images=imgs, extractor=ext, real_images=torch.rand(3, 1, 32, 32) * 2 - 1,
                 k=1)
    assert m["fid_to_fp"] == pytest.approx(0, abs=1e-6) and m["fid"] > 0


def test_missing_inception_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_extractor(f"inception:{tmp_path / 'nope.pth'}")
