"""The charts' x axes: every curve carries step, epoch (fractional within an epoch) and wall time, point by point."""

from __future__ import annotations

from utp_dist.store.runfiles import with_axes


def test_every_curve_gets_step_epoch_and_wall_time():
    series = {
        # epoch 0 ends at step 5, epoch 1 at step 9 (a shorter last epoch)
        "val": {"val_loss": {"x": [0, 1], "step": [5, 9], "y": [0.9, 0.7]}},
        "train": {"train_loss": {"x": [2, 4, 5, 7, 9, 11], "time": [100.0, 102.0, 103.0, 105.0, 107.0, 109.0], "y": [1, 1, 1, 1, 1, 1]}},
        "system": {"ram_mb": {"x": [5], "epoch": [0], "time": [98.0], "y": [500.0]}},
    }
    out = with_axes(series)
    train, val, ram = out["train"]["train_loss"], out["val"]["val_loss"], out["system"]["ram_mb"]
    assert train["step"] == [2, 4, 5, 7, 9, 11]
    assert train["epoch"] == [0.4, 0.8, 1.0, 1.5, 2.0, 2.5]  # past the last end: the last epoch's length carries on
    assert train["time"] == [2.0, 4.0, 5.0, 7.0, 9.0, 11.0]  # from the first point of any curve (the system sample at 98 s)
    assert val["epoch"] == [1, 2] and val["step"] == [5, 9] and val["time"] == [5.0, 9.0]  # read off the train points' times
    assert ram["epoch"] == [1.0] and ram["time"] == [0.0]
    assert "step" not in series["train"]["train_loss"]  # the cached curves are not changed
    empty = with_axes({"train": {"train_loss": {"x": [1], "time": [5.0], "y": [2.0]}}, "val": {}, "system": {}})
    assert empty["train"]["train_loss"]["epoch"] == [None]  # no epoch has ended yet: no epoch axis
