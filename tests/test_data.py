import torch

from diffquant.data import feature_split, from_uint8, load_mnist, to_uint8


def test_mnist_subset_shape_range_and_balance():
    d = load_mnist()
    assert d.images.shape == (5000, 1, 32, 32) and d.images.dtype == torch.float32
    assert float(d.images.min()) == -1.0 and float(d.images.max()) == 1.0
    assert torch.equal(torch.bincount(d.labels), torch.full((10,), 500))
    assert torch.all(d.images[:, :, :2] == -1) and torch.all(d.images[:, :, :, -2:] == -1)  # the padding


def test_feature_split_is_disjoint_and_balanced():
    train, test = feature_split(load_mnist())
    assert len(train) == 4000 and len(test) == 1000
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 100))
    seen = {x.tobytes() for x in to_uint8(train.images)}
    assert not any(x.tobytes() in seen for x in to_uint8(test.images[:200]))


def test_uint8_round_trip():
    x = load_mnist().images[:10]
    assert torch.allclose(from_uint8(to_uint8(x)), x, atol=1 / 127.5)
