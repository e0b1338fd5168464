from diffquant.calibration.collect import collect
from diffquant.nn.swap import quantizable_layers


def test_collects_every_layer_at_every_step_within_budget(tiny_unet, scheduler):
    budget = 20_000
    data = collect(tiny_unet, scheduler, n=8, steps=4, batch_size=8, max_bytes_per_layer=budget, progress=False)
    assert set(data.inputs) == set(quantizable_layers(tiny_unet))
    for name, steps in data.steps.items():
        assert sorted(set(steps)) == [0, 1, 2, 3]
        per_item = data.inputs[name][0][0].numel() * 4
        assert sum(t.numel() * 4 for t in data.inputs[name]) <= max(budget, 4 * per_item)
