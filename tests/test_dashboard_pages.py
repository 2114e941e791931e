"""What the pages show: runs found on disk, the incremental index, a run page, compare, the sweep board, live progress."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_config
from dashboard_support import private_root, serving, wait_until

from utp_dist import states
from utp_dist.preemption import EXIT_RESUMABLE
from utp_dist.store import runfiles
from utp_dist.store.lock import RunLock
from utp_dist.store.run_dir import RunDir


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return private_root(tmp_path_factory, "pages")


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    with serving(root, tmp_path_factory, "pages-db") as running:
        yield running


@pytest.fixture
def web(server):
    with server.client(follow_redirects=False) as client:
        yield client


def finished_runs(web) -> list[dict]:
    return [r for r in web.get("/api/v1/runs", params={"state": "succeeded", "limit": 500}).json() if r["source"] == "disk"]


def csrf(web, path: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', web.get(path).text).group(1)


def test_runs_list_shows_every_run_on_disk(web):
    page = web.get("/web/runs")
    assert page.status_code == 200
    assert "vit__cross_entropy__scratch__root=shapes_seed=1" in page.text and "vit__cross_entropy__scratch__root=shapes_seed=2" in page.text
    assert page.text.count("state-succeeded") >= 2


def test_run_page_shows_progress_figures_config_and_best_export(web):
    run = finished_runs(web)[0]
    page = web.get(f"/web/runs/{run['id']}")
    assert page.status_code == 200
    html = page.text
    assert 'id="confusion-matrix"' in html and "confusion_matrix_test.png" in html and "roc_micro_test.png" in html
    assert 'id="chart-train"' in html and 'id="chart-val"' in html
    assert "monitor_metric: val_acc@1" in html  # the resolved config
    assert re.search(r'id="best-export">[^<]*best-step[0-9]{8}<', html)
    assert "data wait" in html and "MFU" in html and "img/s" in html
    assert web.get("/web/runs/999999").status_code == 404


def test_index_is_incremental(web, root):
    """Only new or changed run folders are read. Counted over all passes (the background indexer runs one every second
    here, and may be the pass that sees a change before the refresh asked for does)."""

    def totals_after_a_pass() -> tuple[int, int]:
        web.post("/api/v1/index/refresh")  # a pass that starts after the change
        index = web.get("/api/v1/index").json()
        return index["runs_read_total"], index["runs_gone_total"]

    read, gone = totals_after_a_pass()
    assert totals_after_a_pass() == (read, gone)  # nothing changed: nothing read
    source = next(p for p in (root / "logs" / "shapes").iterdir() if p.name.endswith("seed=1"))
    copy = source.with_name("copied-run")
    shutil.copytree(source, copy)
    assert totals_after_a_pass() == (read + 1, gone)  # only the new folder was read
    assert "copied-run" in [r["name"] for r in web.get("/api/v1/runs", params={"q": "copied"}).json()]
    line = json.loads((copy / "metrics.jsonl").read_text().splitlines()[0])
    with open(copy / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({**line, "epoch": 2, "step": 27}) + "\n")
    assert totals_after_a_pass() == (read + 2, gone)  # its metrics changed: read again, once
    shutil.rmtree(copy)
    assert totals_after_a_pass() == (read + 2, gone + 1)
    assert web.get("/api/v1/runs", params={"q": "copied"}).json() == []


def test_compare_shows_only_the_config_keys_that_differ(web):
    ids = [r["id"] for r in finished_runs(web)][:2]
    page = web.get("/web/compare", params={"ids": ids})
    assert page.status_code == 200
    table = page.text.split('id="differences"')[1].split("</table>")[0]
    assert "train.seed" in table and "optim.lr" not in table and "data.root" not in table
    # every run differs in its name by construction: listed apart, not in the table
    assert "output.run_name" not in table and "<code>output.run_name</code>" in page.text.split('id="hidden-keys"')[1]
    assert web.get("/web/compare", params={"ids": ids[:1]}).status_code == 422


def test_sweep_board_rows_leaderboard_and_seeds(web):
    sweeps = web.get("/api/v1/sweeps").json()
    assert [(s["name"], s["tasks"], s["executor"]) for s in sweeps] == [("seeds", 4, "debug")]
    board = web.get(f"/api/v1/sweeps/{sweeps[0]['id']}").json()
    assert [r["state"] for r in board["rows"]] == ["succeeded", "succeeded", "failed", "failed"]
    assert [r["kind"] for r in board["rows"]] == ["ok", "ok", "failed", "failed"]
    assert board["rows"][0]["step"] == 18 and board["rows"][0]["best"] is not None
    assert len(board["leaderboard"]) == 4 and board["leaderboard"][0]["rank"] == 1
    good = [g for g in board["seed_groups"] if g["seeds"] == 2]
    assert len(good) == 1 and good[0]["mean"] is not None and good[0]["metric"] == "best val_acc@1"
    page = web.get(f"/web/sweeps/{sweeps[0]['id']}")
    assert "Resubmit failed (2)" in page.text and page.text.count('<tr class="kind-failed">') == 2
    assert "Mean ± std over seeds" in page.text


def test_preempted_and_timeout_are_shown_apart_from_failed():
    assert states.kind(states.PREEMPTED) == states.kind(states.TIMEOUT) == "interrupted"
    assert states.kind(states.FAILED) == states.kind(states.OUT_OF_MEMORY) == "failed"
    assert states.kind(states.SUCCEEDED) == "ok" and states.kind(states.QUEUED) == "waiting"


def test_resubmit_failed_runs_the_cli_code(web, root):
    sweep = web.get("/api/v1/sweeps").json()[0]
    before = json.loads((root / "sweeps" / "seeds" / "sweep.json").read_text())
    page = web.post(f"/web/sweeps/{sweep['id']}/resubmit-failed", data={"csrf": csrf(web, f"/web/sweeps/{sweep['id']}")})
    assert page.status_code == 200 and 'id="message"' in page.text and "resubmit --failed" in page.text
    after = json.loads((root / "sweeps" / "seeds" / "sweep.json").read_text())
    assert len(after["submissions"]) == len(before["submissions"]) + 1
    assert sorted(after["submissions"][-1]["tasks"]) == ["2", "3"]  # only the failed tasks went again


def test_project_config_and_queue_pages(web):
    made = web.post("/web/projects", data={"name": "pages-project", "csrf": csrf(web, "/web/projects")})
    assert made.status_code == 303
    configs = made.headers["location"]
    bad = web.post(configs, data={"name": "bad.yaml", "text": "train:\n  epochs: [1\n", "csrf": csrf(web, configs)})
    assert bad.status_code == 422 and "bad.yaml: line 3, column 1: invalid YAML" in bad.text
    text = (REPO / "configs" / "quickstart.yaml").read_text()
    good = web.post(configs, data={"name": "quickstart", "text": text, "csrf": csrf(web, configs)})
    assert good.status_code == 303
    runs_page = web.get(good.headers["location"])
    config_id = re.search(r'action="/web/configs/(\d+)/queue"', runs_page.text).group(1)
    queued = web.post(f"/web/configs/{config_id}/queue", data={"gpus": "1", "csrf": csrf(web, good.headers["location"])})
    assert queued.status_code == 303
    run_page = web.get(queued.headers["location"])
    assert "state-queued" in run_page.text and ">Cancel</button>" in run_page.text


def test_agents_page_lists_agents_and_gpus(web):
    agent = web.post("/api/v1/agents", json={"name": "gpu-box", "host": "10.1.2.3"}).json()
    web.post("/api/v1/agents/gpus", json={"agent_id": agent["id"], "index": 0, "name": "NVIDIA A100", "memory_mb": 40960})
    page = web.get("/web/agents").text
    assert "gpu-box" in page and "NVIDIA A100 (40960 MiB)" in page


def test_a_running_run_shows_live_progress(web, root, tmp_path):
    """A run training now appears as running and its curves grow without anyone refreshing the index by hand."""
    finished = next((root / "logs" / "shapes").glob("*seed=1/config.yaml"))
    images = Path(yaml.safe_load(finished.read_text())["data"]["root"])
    config = tiny_config(images, root, train={"epochs": 20}, output={"run_name": "live"})
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    child = subprocess.Popen(
        [sys.executable, "-m", "utp_dist.train", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        seen: list[int] = []
        steps: set[int] = set()

        def running_with_points() -> bool:
            runs = web.get("/api/v1/runs", params={"q": "live"}).json()
            if not runs:
                return False
            series = web.get(f"/api/v1/runs/{runs[0]['id']}/series").json()
            if runs[0]["state"] == "running" and series["val"]:
                seen.append(len(series["val"]["val_loss"]["x"]))
                if runs[0]["step"] is not None:  # the row can be indexed before the first log point
                    steps.add(runs[0]["step"])
            return len(set(seen)) >= 2 and any(s % 9 for s in steps)  # new points arrived; the step moved within an epoch

        wait_until(running_with_points, 120, "a running run with growing curves and steps between evaluations")
        child.send_signal(signal.SIGTERM)  # seen growing: no need to train the other epochs
        assert child.wait(timeout=120) == EXIT_RESUMABLE
    finally:
        child.kill()
        child.wait()
    wait_until(lambda: web.get("/api/v1/runs", params={"q": "live"}).json()[0]["state"] == "stopped", 30, "the live run shown stopped")


def test_progress_of_a_training_run_folder_is_step_level(tmp_path):
    """progress.json (each log point) is ahead of metrics.jsonl (each evaluation); summary.json has the last word."""
    folder = RunDir.create(tmp_path, "shapes", "run")
    folder.metrics_file.write_text(json.dumps({"split": "val", "epoch": 0, "step": 9, "val_acc@1": 0.5}) + "\n")
    assert runfiles.progress(folder)["step"] == 9  # no log point yet: the last evaluation
    folder.progress_file.write_text(json.dumps({"epoch": 1, "step": 13, "total_steps": 27, "img_per_s": 40.0}))
    shown = runfiles.progress(folder, {"train": {"epochs": 3}})
    assert (shown["epoch"], shown["epochs"], shown["step"], shown["total_steps"], shown["img_per_s"]) == (1, 3, 13, 27, 40.0)
    folder.progress_file.write_text(json.dumps({"epoch": 0, "step": 4, "total_steps": 27}))  # left by a segment before the state resumed
    assert runfiles.progress(folder)["step"] == 9
    folder.summary_file.write_text(json.dumps({"steps": 27, "last_epoch": 2, "best": {"value": 0.7}}))
    assert (runfiles.progress(folder)["step"], runfiles.progress(folder)["epoch"]) == (27, 2)


def test_a_run_is_running_while_a_process_holds_its_lock_and_not_a_moment_after_kill_9(tmp_path):
    """Liveness is the run lock's holder, not how recently files were written: a killed run is stopped at once."""
    run = RunDir.create(tmp_path, "shapes", "run")
    assert runfiles.disk_state(run) == "unknown" and not run.lock_file.exists()  # asking created no lock file
    code = "import sys, time; from utp_dist.store.lock import RunLock; from utp_dist.store.run_dir import RunDir; "
    code += f"lock = RunLock(RunDir({str(tmp_path)!r}, 'shapes', 'run')).acquire(); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "locked\n"
        assert runfiles.alive(run) and runfiles.disk_state(run) == "running"
        assert RunLock(run).holder()["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert not runfiles.alive(run) and runfiles.disk_state(run) == "unknown"  # its files are seconds old: still not running
    RunLock(run).acquire().release()  # and a probe never kept the lock from the next writer


def test_a_root_that_is_away_forgets_nothing(web, root):
    """An output root on a share that is unmounted for a moment keeps its runs (and their ids) in the index."""
    before = {r["id"] for r in finished_runs(web)}
    (root / "logs").rename(root / "logs-away")
    try:
        assert web.post("/api/v1/index/refresh").json()["runs_gone"] == 0
    finally:
        (root / "logs-away").rename(root / "logs")
    assert web.post("/api/v1/index/refresh").json()["runs_read"] == 0
    assert {r["id"] for r in finished_runs(web)} == before


def test_log_tail_shows_the_last_lines_as_a_terminal_would(web, root):
    run = finished_runs(web)[0]
    log = root / "logs" / run["dataset"] / run["name"] / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(200)) + "train:  10%\rtrain:  50%\rtrain: 100%\nfinished\n")
    try:
        html = web.get(f"/web/runs/{run['id']}").text
        polled = web.get(f"/api/v1/runs/{run['id']}/series", params={"log": True}).json()["log"]  # what the page polls
    finally:
        log.unlink()
    tail = html.split('<pre class="log">')[1].split("</pre>")[0]
    assert polled == tail
    assert tail.endswith("train: 100%\nfinished") and "50%" not in tail  # a progress bar's last redraw only
    assert "line 199" in tail and "line 100\n" not in tail  # the end of a long log


STATE_WORD = re.compile(r'<span class="state [^"]*">([^<]+)</span>')


def test_every_page_and_command_shows_the_states_in_the_same_words(web, server, root, tmp_path, capsys):
    """Runs and jobs in each queue state, sweep tasks in each state the local runner records (older records' words too):
    the run list, the run pages' job tables, the sweep board, `submit status` and `submit leaderboard` show one vocabulary."""
    from utp_dist.dashboard.db import Database, Job, Run
    from utp_dist.sweep.submit import main as submit

    # the queue: one run (and its job) in every state a job takes, as the queue stores them
    database = Database(server.db_url)
    with database.sessions() as session:
        made = [Run(source="queue", state=s, name=f"vocab-{s}", jobs=[Job(state=s)]) for s in states.QUEUE]
        session.add_all(made)
        session.commit()
        ids = [run.id for run in made]
    # a sweep of the local runner: a task record in each state it writes, two in the words of older versions
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a process that has ended: its tasks are lost
    alive, dead = f"pid:{os.getpid()}", f"pid:{gone.pid}"
    records = [
        (None, []),
        ({"state": "queued"}, [alive]),
        ({"state": "running", "pid": os.getpid()}, [alive]),
        ({"state": "succeeded", "exit_code": 0}, [alive]),
        ({"state": "stopped", "exit_code": 75}, [alive]),
        ({"state": "failed", "exit_code": 1}, [alive]),
        ({"state": "running", "pid": gone.pid}, [dead]),
        ({"state": "COMPLETED", "exit_code": 0}, [dead]),
        ({"state": "STOPPED", "exit_code": 75}, [dead]),
    ]
    expected = ["not-submitted", "queued", "running", "succeeded", "stopped", "failed", "lost", "succeeded", "stopped"]
    folder = root / "sweeps" / "vocab"
    (folder / "tasks").mkdir(parents=True)
    task = {"config": "-", "config_hash": "0", "swept": {}, "output_root": str(root), "monitor": ["val_acc@1", "max"]}
    tasks = [{**task, "index": i, "name": f"vocab-task-{i}", "jobs": jobs} for i, (_, jobs) in enumerate(records)]
    for i, (record, _) in enumerate(records):
        if record is not None:
            (folder / "tasks" / f"{i}.json").write_text(json.dumps(record))
    ledger = {
        "name": "vocab",
        "executor": "local",
        "resources": {},
        "created": 0,
        "tasks": tasks,
        "submissions": [{"time": 0, "tasks": {}}],
    }
    (folder / "sweep.json").write_text(json.dumps(ledger))
    try:
        assert submit(["status", str(folder)]) == 0
        out = capsys.readouterr().out.splitlines()
        table = [line.split(" | ") for line in out[2:] if line.startswith("|")]
        assert [row[2] for row in table] == expected
        # below the table, why the failed and the lost ended so: neither recorded an error line, so where its output is
        unexplained = "without an error line (killed, or a crash): see"
        assert out[2 + len(table) :] == [
            f"task {i} {state} {unexplained} {folder / 'local' / f'task-{i}.log'}" for i, state in ((5, "failed"), (6, "lost"))
        ]
        assert submit(["leaderboard", str(folder)]) == 0
        board = capsys.readouterr().out.splitlines()
        assert sorted(line.split(" | ")[-1].rstrip(" |") for line in board[2:] if line.startswith("|")) == sorted(expected)

        web.post("/api/v1/index/refresh")
        sweep = next(s for s in web.get("/api/v1/sweeps").json() if s["name"] == "vocab")
        page = web.get(f"/web/sweeps/{sweep['id']}").text
        assert STATE_WORD.findall(page.split('id="tasks"')[1].split("</table>")[0]) == expected
        assert [r["state"] for r in web.get(f"/api/v1/sweeps/{sweep['id']}").json()["rows"]] == expected

        runs_page = web.get("/web/runs", params={"q": "vocab-", "size": 100}).text
        assert sorted(STATE_WORD.findall(runs_page)) == sorted(states.QUEUE)
        options = re.findall(r"<option ?(?:selected)?>([^<]+)</option>", runs_page)
        assert options == list(states.RUN)  # the filter offers what a run can be, in the same words
        for ident, state in zip(ids, states.QUEUE, strict=True):
            run_page = web.get(f"/web/runs/{ident}").text
            assert STATE_WORD.findall(run_page) == [state, state], state  # the run's state, and its job's
            assert web.get(f"/api/v1/runs/{ident}").json()["state"] == state
        shown = set(STATE_WORD.findall(runs_page)) | set(expected)
        assert shown <= set(states.ALL)
    finally:
        shutil.rmtree(folder)
        with database.sessions() as session:
            for ident in ids:
                session.delete(session.get(Run, ident))
            session.commit()
        database.engine.dispose()
        web.post("/api/v1/index/refresh")


def test_every_backends_words_map_into_the_vocabulary():
    # sacct's job state codes (man sacct), each a word of ours; one it does not know is unknown, never acted on
    sacct = "BOOT_FAIL CANCELLED COMPLETED CONFIGURING COMPLETING DEADLINE FAILED NODE_FAIL OUT_OF_MEMORY PENDING PREEMPTED RUNNING"
    sacct += " RESV_DEL_HOLD REQUEUE_FED REQUEUE_HOLD REQUEUED RESIZING REVOKED SIGNALING SPECIAL_EXIT STAGE_OUT STOPPED SUSPENDED TIMEOUT"
    assert {states.from_slurm(word) for word in sacct.split()} <= set(states.ALL) - {states.UNKNOWN}
    assert states.from_slurm("COMPLETED") == states.SUCCEEDED and states.from_slurm("STOPPED") == states.RUNNING  # SIGSTOP: it goes on
    assert states.from_slurm("SOMETHING_NEW") == states.UNKNOWN
    assert [states.from_exit(code) for code in (0, 75, 1, 2, -9)] == ["succeeded", "stopped", "failed", "failed", "failed"]
    assert [states.from_queue(word) for word in (*states.QUEUE, None, "???")] == [*states.QUEUE, "lost", "unknown"]
    assert {states.kind(word) for word in states.ALL} == {"ok", "running", "interrupted", "failed", "waiting"}
    assert states.RESUBMITTABLE <= states.DONE and states.SUCCEEDED not in states.RESUBMITTABLE
