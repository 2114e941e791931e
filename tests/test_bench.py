"""`python -m utp_dist.bench`: the five throughput figures on this machine, and its errors."""

from __future__ import annotations

import re

import yaml
from conftest import run_cli, run_here, tiny_config


def test_bench_prints_five_measurements_with_ratios(image_root, tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(tiny_config(image_root, tmp_path / "out", data={"num_workers": 1})))
    result = run_cli(str(config), "data.batch_size=4", "--steps", "3", "--warmup", "1", "--repeats", "1", module="utp_dist.bench")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([\d,]+) \|", result.stdout, re.M))
    assert list(rows) == [
        "model step (synthetic batches)",
        "data path (loader -> device)",
        "utp_dist end to end",
        "plain data path (ImageFolder + PIL)",
        "plain loop end to end",
    ]
    values = {k: float(v.replace(",", "")) for k, v in rows.items()}
    assert all(v > 0 for v in values.values())
    ratio = float(re.search(r"\| ([\d.]+)x plain data path \|", result.stdout).group(1))
    assert abs(ratio - values["data path (loader -> device)"] / values["plain data path (ImageFolder + PIL)"]) < 0.02
    assert "is the bottleneck" in result.stdout.splitlines()[-1]
    assert not (tmp_path / "out").exists()  # the bench writes no run


def test_bench_user_errors_are_one_line(tmp_path):
    result = run_here(str(tmp_path / "missing.yaml"), module="utp_dist.bench")  # in this process: the run above is end to end
    assert result.returncode == 2 and result.stderr.strip() == f"utp_dist: error: config file not found: {tmp_path / 'missing.yaml'}"
