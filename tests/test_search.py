"""Adaptive search: the pause point, the search file, ASHA with pause and promote on real worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_image_folder, tiny_config
from safetensors.torch import load_file

from utp_dist.config import from_dict
from utp_dist.preemption import Stopped


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("search") / "shapes", per_class={"train": 8, "val": 4})


def _weights(out: Path) -> dict:
    (run,) = (out / "checkpoints" / "shapes").iterdir()
    (state,) = sorted((run / "state").glob("step-*"))[-1:]
    return load_file(state / "model.safetensors")


def test_a_run_paused_at_an_epoch_and_continued_equals_one_trained_straight(data, tmp_path, fresh_accelerate):
    from utp_dist.train import train

    def config(out: str, **train_keys):
        return from_dict(tiny_config(data, tmp_path / out, train={"epochs": 3, **train_keys}, data={"num_workers": 0}))

    train(config("straight"))
    with pytest.raises(Stopped, match="paused at epoch 1"):
        train(config("paused", stop_at_epoch=1))
    assert [p.name for p in (tmp_path / "paused" / "checkpoints" / "shapes").glob("*/FINISHED")] == []
    summary = train(config("paused", stop_at_epoch=1))  # the same pause point again: it is behind the run, training goes on
    assert summary["restarts"] == 1
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "paused")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
