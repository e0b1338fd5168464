import pytest
import torch

from diffquant.pipelines import balanced_labels, parse_labels, sample


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_i_does_not_depend_on_batching(tiny_unet, scheduler, sampler):
    labels = balanced_labels(6)
    a = sample(tiny_unet, scheduler, labels, steps=3, batch_size=6, sampler=sampler, progress=False)
    b = sample(tiny_unet, scheduler, labels, steps=3, batch_size=4, sampler=sampler, progress=False)
    assert a.shape == (6, 1, 16, 16)
    assert torch.allclose(a, b, atol=1e-5)


def test_seed_changes_samples(tiny_dit, scheduler):
    labels = balanced_labels(2)
    a = sample(tiny_dit, scheduler, labels, steps=2, seed=0, progress=False)
    b = sample(tiny_dit, scheduler, labels, steps=2, seed=1, progress=False)
    assert not torch.allclose(a, b)


def test_labels():
    assert balanced_labels(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert parse_labels("3", 3).tolist() == [3, 3, 3]
    assert parse_labels("1-3", 4).tolist() == [1, 2, 3, 1]
    with pytest.raises(ValueError, match="0..9"):
        parse_labels("12", 2)


def test_sampling_to_file_resumes_after_an_interruption(tiny_dit, scheduler, tmp_path, monkeypatch):
    import numpy as np

    import diffquant.pipelines as pl

    labels = balanced_labels(6)
    out = tmp_path / "s.npz"
    real = pl.sample_batch
    calls = []

    def flaky(*a, **k):
        calls.append(a[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pl, "sample_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        pl.sample_to_npz(tiny_dit, scheduler, labels, out, steps=2, batch_size=2, progress=False)
    assert not out.exists()  # nothing half-written
    calls.clear()
    monkeypatch.setattr(pl, "sample_batch", lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1])
    imgs = pl.sample_to_npz(tiny_dit, scheduler, labels, out, steps=2, batch_size=2, progress=False)
    assert calls == [2, 4]  # the first batch was not redone
    full = pl.to_uint8(sample(tiny_dit, scheduler, labels, steps=2, progress=False))
    assert np.abs(imgs.astype(int) - full.astype(int)).max() <= 1
