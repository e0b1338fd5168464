import math
import random

import pytest

from diffquant.metrics.noise import seed_band


def test_band_is_the_prediction_interval_of_one_more_run():
    band = seed_band([1.0, 2.0, 3.0, 4.0, 5.0])
    assert band.mean == pytest.approx(3.0)
    assert band.std == pytest.approx(math.sqrt(2.5))  # ddof=1
    assert (band.lo, band.hi) == (1.0, 5.0)
    # t(0.975, 4) = 2.7764
    assert band.half_width == pytest.approx(2.7764 * math.sqrt(2.5) * math.sqrt(1.2), rel=1e-4)
    assert band.to_dict()["band"] == pytest.approx([3.0 - band.half_width, 3.0 + band.half_width])


def test_a_further_seed_lands_inside_about_95_percent_of_the_time():
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        band = seed_band([rng.gauss(5.0, 0.1) for _ in range(4)])
        hits += band.judge(rng.gauss(5.0, 0.1))["within_band"]
    assert 0.93 < hits / 2000 < 0.97


def test_a_shifted_value_is_outside():
    rng = random.Random(1)
    band = seed_band([rng.gauss(5.0, 0.1) for _ in range(8)])
    far = band.judge(5.6)
    assert not far["within_band"] and not far["within_range"] and far["z"] > 4


def test_two_agreeing_seeds_do_not_make_a_narrow_band():
    band = seed_band([6.89, 6.90])
    assert band.half_width > 10 * band.std
    assert band.judge(6.95)["within_band"]


def test_zero_spread_is_only_met_exactly():
    band = seed_band([0.5, 0.5])
    assert band.judge(0.5)["within_band"]
    assert band.judge(0.51)["z"] == math.inf and not band.judge(0.51)["within_band"]


def test_one_seed_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="2 or more seeds.*--seed"):
        seed_band([1.0])


def test_a_known_floor_keeps_tied_seeds_from_a_zero_band():
    p, n = 0.957, 1000
    band = seed_band([p, p], min_std=math.sqrt(p * (1 - p) / n))
    assert band.std == pytest.approx(0.00642, rel=1e-2)
    assert band.judge(0.953)["within_band"]
