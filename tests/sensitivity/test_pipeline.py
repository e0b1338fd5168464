"""The sensitivity pipeline's extra options: parsing, where descents start, and the gain-weighted cost."""

import pytest

from diffquant.sensitivity.explain import descend
from diffquant.sensitivity.pipeline import _descent_bases, extra_option_list, gain_weighted
from diffquant.sensitivity.predictor import summed_error
from diffquant.sensitivity.space import Option, SearchSpace, all_options


def test_extra_options_are_a_method_at_every_width_or_one_option():
    assert extra_option_list(("aq", "uaq-8")) == [Option("aq", 2), Option("aq", 3), Option("aq", 4), Option("uaq", 8)]
    with pytest.raises(ValueError, match="method must be one of"):
        extra_option_list(("fp",))
    with pytest.raises(ValueError, match="option keys look like"):
        extra_option_list(("fp16",))


def test_descents_start_at_each_methods_widest_option(tiny_dit):
    options = [*all_options(bits=(2, 4), methods=("uaq", "kmeans-a")), Option("uaq", 8)]
    space = SearchSpace(tiny_dit, options).build(progress=False)
    labels = {o.key: {"bits": space.effective_bits({u: o for u in space.units})} for o in options}
    assert _descent_bases(space, labels, 3.0) == [Option("uaq", 8), Option("kmeans-a", 4)]
    assert _descent_bases(space, {k: v for k, v in labels.items() if k != "uaq-8"}, 3.0) == [Option("kmeans-a", 4)]


def test_gain_weighted_descent_keeps_the_high_gain_layer_at_8_bits(tiny_dit):
    """The layers' errors weighted by their gain: the descent from 8 bits lowers every other unit
    before the one whose errors reach the output a thousand times more."""
    space = SearchSpace(tiny_dit, all_options(bits=(2, 4, 8), methods=("uaq",))).build(progress=False)
    loud = "proj_out_1"
    gain = {n: 1000.0 if n == loud else 1.0 for n in space.layers}
    gained = gain_weighted(space.rel_error, gain)
    config = descend(space, Option("uaq", 8), 4.0, lambda cs: summed_error(space, cs, gained), any_method=True)
    assert space.effective_bits(config) <= 4.0
    assert config[loud] == Option("uaq", 8)
    assert sum(o.bits == 8 for o in config.values()) < len(config) / 2
