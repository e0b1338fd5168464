import json

from diffquant.models import load
from diffquant.zoo.train import train


def test_training_resumes_and_writes_a_loadable_folder(tmp_path):
    out, state = tmp_path / "model", tmp_path / "state"
    train("mnist-dit", out=out, state_dir=state, steps=1, progress=False)
    train("mnist-dit", out=out, state_dir=state, steps=2, progress=False)
    record = json.loads((out / "diffquant.json").read_text())["training"]
    assert record["steps_done"] == 2 and len(record["loss_every_100"]) == 1
    model, scheduler = load(out)
    assert model.dq_meta.name == "mnist-dit" and scheduler.config.num_train_timesteps == 1000
