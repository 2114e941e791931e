"""System metrics: NVML readings through the fake NVML library, CPU and RAM of a real training run on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from utp_dist.config import ConfigError, from_dict
from utp_dist.store.run_dir import RunDir
from utp_dist.system_metrics import GpuReader, NullSampler, SystemSampler

FAKE = Path(__file__).parent / "fake_nvml" / "pynvml.py"


@pytest.fixture
def fake_nvml(monkeypatch):
    """The fake NVML in place of nvidia-ml-py, reporting two GPUs; GPU 1 has no power sensor."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setenv("UTP_TEST_FAKE_GPUS", "2")
    monkeypatch.setenv("UTP_TEST_FAKE_NO_POWER", "1")
    return module


class Recorder:
    def __init__(self):
        self.logged = []

    def log_scalars(self, values, step):
        self.logged.append((step, dict(values)))


def test_gpus_are_read_by_index_and_uuid_and_a_missing_sensor_is_absent_not_zero(fake_nvml):
    reader = GpuReader(visible="1,GPU-fake-0")
    values = reader.read()
    reader.close()
    assert values == {
        "system/gpu1/util": 20.0,
        "system/gpu1/memory_used_mb": 2048.0,
        "system/gpu1/temperature_c": 41.0,
        "system/gpuGPU-fake-0/util": 10.0,
        "system/gpuGPU-fake-0/memory_used_mb": 1024.0,
        "system/gpuGPU-fake-0/power_w": 100.0,
        "system/gpuGPU-fake-0/temperature_c": 40.0,
    }
    assert GpuReader(visible="").read() == {}  # CUDA_VISIBLE_DEVICES="": the process sees no GPU
    assert set(GpuReader(visible=None).read()) >= {"system/gpu0/util", "system/gpu1/util"}  # unset: every GPU


def test_without_a_driver_cpu_and_ram_are_sampled_and_gpu_series_are_absent(fake_nvml, monkeypatch, tmp_path):
    monkeypatch.setenv("UTP_TEST_FAKE_GPUS", "0")  # NVML finds no driver
    run = RunDir(tmp_path, "data", "run")
    run.logs.mkdir(parents=True)
    tracker = Recorder()
    sampler = SystemSampler(run, tracker, node=0, every_s=3600, gpus=True)
    sampler.sample(2, 0)
    sampler.sample(4, 0)  # younger than every_s: skipped
    sampler.sample(5, 0, force=True)  # an epoch end samples always
    sampler.close()
    assert [step for step, _ in tracker.logged] == [2, 5]
    assert set(tracker.logged[0][1]) == {"system/cpu_percent", "system/ram_mb"}
    samples = run.read_system()
    assert [(s["step"], s["epoch"], s["node"]) for s in samples] == [(2, 0, 0), (5, 0, 0)]
    assert samples[0]["ram_mb"] > 10 and samples[0]["cpu_percent"] >= 0
    assert not any(key.startswith("gpu") for key in samples[0])


def test_a_cpu_run_reports_no_gpu_even_where_nvml_sees_some(fake_nvml, tmp_path):
    run = RunDir(tmp_path, "data", "run")
    run.logs.mkdir(parents=True)
    sampler = SystemSampler(run, Recorder(), node=2, every_s=0, gpus=False)
    sampler.sample(1, 0)
    assert run.system_file(2).name == "system-node2.jsonl"
    assert set(run.read_system(2)[0]) == {"time", "step", "epoch", "node", "cpu_percent", "ram_mb"}
    NullSampler().sample(1, 0)  # the other processes' sampler: nothing, not even a file
    assert sorted(p.name for p in run.logs.iterdir()) == ["system-node2.jsonl"]


def test_a_cut_line_is_left_out(tmp_path):
    run = RunDir(tmp_path, "data", "run")
    run.logs.mkdir(parents=True)
    run.system_file().write_text('{"step": 1, "ram_mb": 5}\n{"step": 2, "ram_')
    assert run.read_system() == [{"step": 1, "ram_mb": 5}]


def test_bad_interval_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"output.system_every_s must be >= 0 seconds"):
        from_dict({"data": {"root": str(tmp_path)}, "output": {"system_every_s": -1}})


def test_training_on_cpu_logs_cpu_and_ram_at_log_points(image_root, tmp_path, fresh_accelerate):
    from utp_dist.trainer import Trainer

    raw = tiny_config(image_root, tmp_path / "out", train={"epochs": 1}, output={"root": str(tmp_path / "out"), "system_every_s": 0})
    summary = Trainer(from_dict(raw)).fit()
    logs = Path(summary["paths"]["logs"])
    lines = [json.loads(line) for line in (logs / "system.jsonl").read_text().splitlines()]
    # 72 images / 8 = 9 steps, logged every 2 steps and at the epoch end
    assert [line["step"] for line in lines] == [2, 4, 6, 8, 9, 9]
    assert all(line["ram_mb"] > 50 for line in lines) and not any(k.startswith("gpu") for line in lines for k in line)
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"system/cpu_percent", "system/ram_mb"} <= set(tags) and not [t for t in tags if t.startswith("system/gpu")]


# --- the dashboard: the run page's series, the agents' heartbeats


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dashboard_support import private_root, serving

    with serving(private_root(tmp_path_factory, "system"), tmp_path_factory, "system-db") as running:
        yield running


@pytest.fixture
def web(server):
    with server.client(follow_redirects=False) as client:
        yield client


def test_run_series_carry_cpu_and_ram_and_no_gpu_of_a_cpu_run(web):
    run = next(r for r in web.get("/api/v1/runs", params={"state": "succeeded"}).json() if r["source"] == "disk")
    system = web.get(f"/api/v1/runs/{run['id']}/series").json()["system"]
    assert set(system) == {"cpu_percent", "ram_mb"}
    assert system["ram_mb"]["x"][-1] == run["step"] and all(y > 10 for y in system["ram_mb"]["y"])
    assert len(system["ram_mb"]["time"]) == len(system["ram_mb"]["epoch"]) == len(system["ram_mb"]["x"])
    page = web.get(f"/web/runs/{run['id']}").text
    assert 'id="system-charts"' in page and '"ram_mb"' in page


def test_heartbeats_carry_gpu_usage_and_the_agents_page_shows_it_with_online_badges(web):
    import re

    gpus = [{"index": 0, "name": "Fake GPU", "memory_mb": 81920}, {"index": 1, "name": "Fake GPU", "memory_mb": 81920}]
    agent_id = web.post("/api/v1/agents/register", json={"name": "busy-box", "host": "h1", "gpus": gpus}).json()["agent_id"]
    usage = [{"index": 0, "util": 87.0, "memory_used_mb": 30000}, {"index": 1, "util": None}, {"index": 7, "util": 5.0}]
    assert web.post(f"/api/v1/agents/{agent_id}/heartbeat", json={"jobs": [], "name": "busy-box", "gpus": usage}).status_code == 200
    shown = web.get(f"/api/v1/agents/{agent_id}").json()["gpus"]
    assert [(g["index"], g["util"], g["memory_used_mb"]) for g in shown] == [(0, 87.0, 30000), (1, None, None)]  # GPU 7 is not its
    bad = web.post(f"/api/v1/agents/{agent_id}/heartbeat", json={"jobs": [], "gpus": [{"index": 0, "util": 150}]})
    assert bad.status_code == 422 and "util" in bad.text
    dead = web.post("/api/v1/agents", json={"name": "dead-box"}).json()  # never sent a heartbeat: offline
    page = web.get("/web/agents").text
    row = lambda name: re.search(rf'<tr class="agent" data-agent="{name}">.*?</tr>', page, re.S).group(0)  # noqa: E731
    assert "state-online" in row("busy-box") and "87 %" in row("busy-box") and "30000 MiB</span> used" in row("busy-box")
    assert "state-offline" in row("dead-box") and "Delete" in row("dead-box") and "Delete" not in row("busy-box")
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert web.post(f"/web/agents/{dead['id']}/delete", data={"csrf": token}).status_code == 303
    assert web.get(f"/api/v1/agents/{dead['id']}").status_code == 404
    assert web.post(f"/web/agents/{agent_id}/delete", data={"csrf": "wrong"}).status_code == 403


def test_an_agent_reports_its_own_gpus_usage(fake_nvml):
    from utp_dist.agent.loop import Agent

    agent = Agent(None, "box", [{"index": 1, "name": "Fake GPU", "memory_mb": 81920}], runner=None)
    assert agent.gpu_usage() == [{"index": 1, "util": 20.0, "memory_used_mb": 2048}]
    assert Agent(None, "cpu-box", [], runner=None).gpu_usage() == []
