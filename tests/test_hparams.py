"""TensorBoard's HParams dashboard: every run writes its hyper-parameters and final metrics, read back with TensorBoard's reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from utp_dist.config import DEFAULT_HPARAMS, ConfigError, from_dict
from utp_dist.store.run_dir import RunDir
from utp_dist.tracking import TensorBoardTracker


def read_hparams(logs: Path) -> tuple[dict, set[str], bool, dict]:
    """(hyper-parameters, declared metric tags, whether the session ended, last value of every scalar) of one run folder."""
    events = EventAccumulator(str(logs), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    values = {key: getattr(value, value.WhichOneof("kind")) for key, value in start.hparams.items()}
    ended = metadata.SESSION_END_INFO_TAG in content
    if ended:
        status = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG]).status
        ended = status == api_pb2.STATUS_SUCCESS
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    return values, {m.name.tag for m in experiment.metric_infos}, ended, scalars


def test_a_run_outside_a_grid_shows_the_default_hyper_parameters(tmp_path):
    run = RunDir(tmp_path, "data", "run")
    run.logs.mkdir(parents=True)
    cfg = from_dict({"optim": {"lr": 0.01}, "train": {"monitor_metric": "val_f1_macro"}})
    tracker = TensorBoardTracker(run, 10)
    tracker.write_config(cfg)
    tracker.write_summary({"best": {"metric": "val_f1_macro", "value": 0.5}, "steps": 10})
    tracker.close()
    values, metrics, ended, scalars = read_hparams(run.logs)
    assert set(values) == set(DEFAULT_HPARAMS) and values["optim.lr"] == 0.01 and values["model.flavour"] == "resnet"
    assert {"val/acc@1", "val/f1_macro", "best/val_f1_macro", "test/acc@1"} <= metrics
    assert ended and scalars["best/val_f1_macro"] == 0.5


def test_output_hparams_names_config_keys():
    assert from_dict({"output": {"hparams": ["model.config.hidden_size"]}}).output.hparams == ["model.config.hidden_size"]
    with pytest.raises(ConfigError, match="output.hparams: 'optim.lrr' is not a config key"):
        from_dict({"output": {"hparams": ["optim.lrr"]}})
