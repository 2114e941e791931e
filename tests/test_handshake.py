"""The run handshake: a training process started with $UTP_DIST_HANDSHAKE names its run folder there once it claimed
it, and its outcome at its end (real `python -m utp_dist.train` processes, real signals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, make_image_folder, tiny_config
from dashboard_support import wait_until

from utp_dist.store import handshake
from utp_dist.store.run_dir import RunDir

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("handshake") / "shapes", per_class={"train": 8, "val": 3})


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """A run that trains to its end, started once for the module so it trains while the stop test runs too."""
    folder = tmp_path_factory.mktemp("finished")
    proc, told = start(folder, tiny_config(images, folder / "out", train={"epochs": 1}))
    yield folder, proc, told
    if proc.poll() is None:
        proc.kill()


def start(tmp_path, config: dict, *overrides: str, **env: str) -> tuple[subprocess.Popen, object]:
    """`python -m utp_dist.train` told to write its handshake to tmp_path/handshake.json; (process, handshake path)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    told = tmp_path / "handshake.json"
    with open(tmp_path / "stderr.txt", "wb") as err:  # a file, not a pipe: the progress bar must never block on a full pipe
        proc = subprocess.Popen(
            [sys.executable, "-m", "utp_dist.train", str(path), *overrides],
            env={**ENV, handshake.HANDSHAKE_ENV: str(told), **env},
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
        )
    return proc, told


def stderr(told) -> str:
    return (told.parent / "stderr.txt").read_text()[-3000:]


def wait_for(predicate, proc: subprocess.Popen, told, what: str) -> None:
    """Poll until `predicate` holds; fail with the process's stderr if it ended first."""
    wait_until(lambda: predicate() or proc.poll() is not None, 120, what, told.parent / "stderr.txt")
    assert proc.poll() is None, stderr(told)


def test_a_config_error_says_failed_with_the_cli_line_and_no_folder(images, tmp_path):
    proc, told = start(tmp_path, tiny_config(images, tmp_path / "out"), "train.epochz=1")
    assert proc.wait(timeout=120) == 2
    line = stderr(told).strip()
    said = handshake.read(told)
    assert (said.reason, said.exit_code, said.run_folder) == ("failed", 2, None)
    assert said.error == line.removeprefix("utp_dist: error: ") and "train.epochz" in said.error and "\n" not in said.error
    assert not (tmp_path / "out").exists()


def test_sigterm_names_the_folder_while_it_trains_then_stopped_75(images, tmp_path, finished):
    config = tiny_config(images, tmp_path / "out", train={"epochs": 50, "log_every_n_steps": 1, "callbacks": ["tests.hooks:SlowSteps"]})
    proc, told = start(tmp_path, config, UTP_TEST_STEP_SLEEP="0.2")
    try:
        wait_for(lambda: handshake.read(told).run_folder is not None, proc, told, "the run folder in the handshake")
        running = handshake.read(told)
        assert running.reason is None and running.run_folder.logs.is_dir()  # named while it runs, no outcome yet
        assert json.loads(told.read_text())["pid"] == proc.pid
        wait_for(lambda: running.run_folder.read_progress(), proc, told, "a log point")  # in the loop, where a stop is handled
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75, stderr(told)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = handshake.read(told)
    assert (said.reason, said.exit_code, said.error, said.run_folder) == ("stopped", 75, None, running.run_folder)
    assert said.run_folder.states()  # it saved before it stopped: the folder it named is the one to continue


def test_a_finished_run_names_its_folder_and_completed(finished):
    folder, proc, told = finished
    assert proc.wait(timeout=300) == 0, stderr(told)
    said = handshake.read(told)
    assert said.run_folder == RunDir((folder / "out").resolve(), "shapes", said.run_folder.name)
    assert said.run_folder.read_summary()["steps"] == 3  # the folder it named is the run it trained
    assert (said.reason, said.exit_code, said.error) == ("completed", 0, None)


def test_only_rank_0_writes_and_nothing_without_the_variable(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path / "out", "shapes", "run")
    monkeypatch.setenv(handshake.HANDSHAKE_ENV, str(tmp_path / "rank1.json"))
    handshake.begin(rank=1)  # another rank of a launch: the claiming rank speaks for the run
    handshake.claimed(run)
    handshake.end(0, None)
    assert not (tmp_path / "rank1.json").exists()
    monkeypatch.delenv(handshake.HANDSHAKE_ENV)
    handshake.begin(rank=0)
    handshake.claimed(run)
    handshake.end(0, None)
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]
    assert handshake.read(tmp_path / "missing.json") == handshake.Handshake()


def test_the_indexer_leaves_a_starting_jobs_folder_to_its_agent_one_row_per_folder(images, tmp_path):
    """A folder a live process writes while a job's agent has not reported its folder gets no row of its own; the
    report puts it on the queued run's row, and the indexer then updates that row: never two rows, none deleted."""
    from sqlalchemy import func, select

    from utp_dist.dashboard import jobqueue, migrate, services
    from utp_dist.dashboard.db import Database, Run
    from utp_dist.dashboard.indexer import Indexer
    from utp_dist.store.lock import RunLock

    root = (tmp_path / "root").resolve()
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate.upgrade(database.engine)
    indexer = Indexer((root,), database.sessions)
    with database.sessions() as session:
        project = services.create_project(session, "p")
        config = services.create_config(session, project.id, "tiny", tiny_config(images, root))
        run, job = jobqueue.queue_run(session, config.id)
        agent = jobqueue.register(session, "a", "host", [], drain=False, lease_s=30)
        attempt = jobqueue.claim(session, agent.id, 0, True, [], lease_s=30)["attempt"]
        jobqueue.start(session, job.id, agent.id, attempt, pid=1)
        folder = RunDir.create(root, "shapes", "tiny")
        lock = RunLock(folder).acquire()  # the job's training claimed it; its agent has not read the handshake yet
        assert indexer.refresh()["runs"] == 0
        reported = {"root": str(root), "dataset": "shapes", "name": "tiny"}
        jobqueue.progress(session, job.id, agent.id, attempt, reported, {"step": 3})
        cli = RunDir.create(root, "shapes", "from-the-cli")
        cli_lock = RunLock(cli).acquire()  # no job is starting any more: a live CLI run is indexed as ever
        assert indexer.refresh()["runs"] == 2
        session.expire_all()
        rows = {r.name: (r.id, r.source, r.state) for r in session.scalars(select(Run))}
        assert rows == {"tiny": (run.id, "queue", "running"), "from-the-cli": (rows["from-the-cli"][0], "disk", "running")}
        assert session.scalar(select(func.count()).select_from(Run)) == 2
        lock.release()
        cli_lock.release()
    database.engine.dispose()
