"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright): the flow a user clicks through."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_image_folder, tiny_config
from dashboard_support import logged_in_page, private_root, serving
from playwright.sync_api import expect

README_SCREENSHOT = REPO / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return private_root(tmp_path_factory, "browser")


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    # the live-run test slows its steps with a callback of tests.hooks, which configs may name only when allowed
    with serving(root, tmp_path_factory, "browser-db", flags=("--allow-import", "tests.hooks")) as running:
        yield running


@pytest.fixture(scope="module")
def page(server):
    with logged_in_page(server) as page:
        assert page.url.endswith("/web/runs")
        yield page


def shot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_create_project_paste_config_queue_and_see_a_finished_run(page, tmp_path):
    page.goto("/web/projects")
    page.fill("#new-project input[name=name]", "fashion")
    page.fill("#new-project input[name=description]", "the quickstart")
    page.click("#new-project button")
    expect(page.locator("h1")).to_contain_text("fashion / configs")

    page.fill("#new-config input[name=name]", "quickstart")
    page.fill("#new-config textarea[name=text]", (REPO / "configs" / "quickstart.yaml").read_text())
    shot(page, tmp_path, "1-config")
    page.click("#new-config button")
    expect(page.locator("h1")).to_contain_text("fashion / runs")

    page.click("text=Queue run")
    expect(page.locator("#run-state")).to_contain_text("queued")
    shot(page, tmp_path, "2-queued-run")

    page.goto("/web/runs")
    expect(page.locator("table.runs")).to_contain_text("seed=1")
    expect(page.locator("table.runs")).to_contain_text("queued")
    shot(page, tmp_path, "3-runs-list")

    page.click("table.runs a:has-text('seed=1')")
    expect(page.locator("#run-state")).to_contain_text("succeeded")
    expect(page.locator("#chart-train .uplot")).to_be_visible()  # the chart was drawn from the run's TensorBoard events
    expect(page.locator("#chart-val .uplot")).to_be_visible()
    matrix = page.locator("img#confusion-matrix")
    expect(matrix).to_be_visible()
    assert matrix.evaluate("img => img.complete && img.naturalWidth > 100")  # the PNG really loaded
    run_page = shot(page, tmp_path, "4-run-page")
    if os.environ.get("UTP_UPDATE_DOCS") == "1":  # refresh the README's picture on purpose, not on every test run
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(run_page, README_SCREENSHOT)

    page.goto("/web/runs")
    page.locator("input[name=ids]").nth(1).check()
    page.locator("input[name=ids]").nth(2).check()
    page.click("#compare-ticked")
    expect(page.locator("#differences")).to_contain_text("train.seed")
    expect(page.locator("#chart-compare-val .uplot")).to_be_visible()
    shot(page, tmp_path, "5-compare")

    page.goto("/web/sweeps")
    page.click("text=seeds")
    expect(page.locator("#tasks")).to_contain_text("failed")
    shot(page, tmp_path, "6-sweep-board")

    page.goto("/web/projects")
    expect(page.locator("table")).to_contain_text("fashion")
    shot(page, tmp_path, "7-projects")
    page.goto("/web/agents")
    page.fill("#new-agent input[name=name]", "cpu-box")
    page.fill("#new-agent input[name=host]", "127.0.0.1")
    page.click("#new-agent button")
    expect(page.locator("#agents")).to_contain_text("cpu-box")
    expect(page.locator("#agents")).to_contain_text("CPU only")
    shot(page, tmp_path, "8-agents")
    assert page.errors == []  # no JavaScript error on any page
    print(f"screenshots in {tmp_path}")


LIVE_CHART = """async () => {
  const settle = () => new Promise((resolve) => setTimeout(resolve, 100));  // uPlot commits scale changes asynchronously
  const el = document.createElement("div");
  el.style.width = "600px";
  document.body.appendChild(el);
  const draw = utp.liveChart(el, "loss", "step");
  const curves = (n) => [{x: [...Array(n).keys()], y: [...Array(n).keys()]}, {x: [...Array(n).keys()], y: [...Array(n).keys()].map((v) => -v)}];
  draw(["a", "b"], curves(5));
  await settle();
  const plot = draw.plot();
  plot.setScale("x", {min: 1, max: 3});  // the user zoomed in
  plot.setSeries(2, {show: false});      // and switched series b off in the legend
  await settle();
  draw(["a", "b"], curves(9));           // new points arrive
  await settle();
  const kept = {same: draw.plot() === plot, min: plot.scales.x.min, max: plot.scales.x.max, shown: plot.series[2].show, points: plot.data[0].length};
  const other = utp.liveChart(el.appendChild(document.createElement("div")), "acc", "epoch");
  other(["a"], curves(3).slice(0, 1));
  await settle();
  other(["a"], curves(7).slice(0, 1));   // not zoomed: the chart grows with the data
  await settle();
  return {kept, grown: other.plot().scales.x.max};
}"""


def test_live_chart_keeps_zoom_and_selection_when_points_arrive(page):
    page.goto("/web/runs")
    result = page.evaluate(LIVE_CHART)
    assert result["kept"] == {"same": True, "min": 1, "max": 3, "shown": False, "points": 9}
    assert result["grown"] == 6
    assert page.errors == []


def test_api_docs_render_without_internet(page):
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info")).to_contain_text("utp_dist dashboard")
    expect(page.locator(".swagger-ui")).to_contain_text("/api/v1/runs/from-config/{config_id}")
    expect(page.locator(".swagger-ui .authorize")).to_be_visible()  # the bearer scheme: paste the token there
    assert page.errors == []


def test_sweep_board_refreshes_without_a_reload(page, root):
    page.goto("/web/sweeps")
    page.click("text=seeds")
    tasks = page.locator("#tasks")
    expect(tasks.locator("tr.kind-failed")).to_have_count(2)
    page.evaluate("() => { window.notReloaded = true; utp.refreshTables(['tasks'], 0.3); }")
    record = root / "sweeps" / "seeds" / "tasks" / "2.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "state": "succeeded", "exit_code": 0}))  # the task was rerun
    expect(tasks.locator("tr.kind-failed")).to_have_count(1)
    assert page.evaluate("() => window.notReloaded") is True  # the same page, its table swapped
    assert page.errors == []


# the val-loss chart's canvas: pixels of its series colour, and whether one lies in the middle third (a lone point centred)
SERIES_PIXELS = """() => {
  const canvas = document.querySelector("#chart-val-loss canvas");
  const { width, height } = canvas;
  const pixels = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  let count = 0, middle = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    if (Math.abs(pixels[i] - 0x24) + Math.abs(pixels[i + 1] - 0x58) + Math.abs(pixels[i + 2] - 0xc4) < 60 && pixels[i + 3] > 200) {
      count += 1;
      const x = (i / 4) % width;
      if (x > width / 3 && x < (2 * width) / 3) middle += 1;
    }
  }
  return { count, middle };
}"""


def shown(page) -> dict:
    """What the run page shows now, read in one go (so title and badge are compared at the same moment)."""
    return page.evaluate(
        """() => ({
      name: document.getElementById("run-name").textContent, state: document.querySelector("#run-state").textContent.trim(),
      epoch: document.getElementById("epoch").textContent, step: document.getElementById("step").textContent,
      log: document.querySelector("#log-tail pre.log")?.textContent ?? "", waiting: !document.getElementById("poll-status").hidden,
    })"""
    )


def step(now: dict) -> int:
    """The step a reading shows (-1 for '-')."""
    done = now["step"].split(" / ")[0]
    return int(done) if done.isdigit() else -1


def watch(page, until, timeout: float, what: str) -> list[dict]:
    """The page as it was every 0.3 s until `until(now)` holds; every reading, for what happened on the way."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(shown(page))
        if until(seen[-1]):
            return seen
        time.sleep(0.3)
    raise AssertionError(f"the run page never showed {what}; last: {seen[-1] if seen else None}")


def test_a_queued_run_is_live_on_its_page_through_a_server_restart(page, server, root, tmp_path):
    """An agent takes a queued run; without a reload its page follows it step by step within the epoch and line by line
    in its log, keeps trying while the server restarts, and shows figures and test metrics at the end."""
    with server.client() as api:
        for run in api.get("/api/v1/runs", params={"state": "queued"}).json():  # what earlier tests queued would go first
            api.post(f"/api/v1/runs/{run['id']}/cancel")
        images = make_image_folder(tmp_path / "shapes")
        project = api.post("/api/v1/projects", json={"name": "live"}).json()["id"]
        # one epoch of 18 steps, slowed down so the page can be watched in the middle of it (a single evaluation)
        train = {"epochs": 1, "log_every_n_steps": 1, "callbacks": ["tests.hooks:SlowSteps"]}
        config = tiny_config(images, root, data={"batch_size": 4}, train=train)
        config_id = api.post("/api/v1/configs", json={"project_id": project, "name": "tiny", "config": config}).json()["id"]
        run_id = api.post(f"/api/v1/runs/from-config/{config_id}", json={}).json()["run_id"]
    page.goto(f"/web/runs/{run_id}")
    assert shown(page)["name"] == "(waiting for an agent)" and shown(page)["state"] == "queued"
    page.evaluate("() => { window.notReloaded = true; }")
    command = [
        sys.executable,
        "-m",
        "utp_dist.agent",
        "--server",
        server.url,
        "--name",
        "browser-agent",
        "--gpus",
        "none",
        "--poll",
        "0.5",
        "--allow-import",
        "tests.hooks",
    ]
    fast_forward = tmp_path / "fast-forward"  # made once the page has followed the run through the restart
    env = {**os.environ, "PYTHONPATH": str(REPO), "UTP_TEST_STEP_SLEEP": "1", "UTP_TEST_STEP_SLEEP_UNTIL": str(fast_forward)}
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(command, env={**env, **server.xdg_env()}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        # within the first (and only) epoch the step moves and the log tail grows, from the agent's reports
        seen = watch(page, lambda now: 2 <= step(now) <= 9, 120, "a step early in the first epoch")
        running = [s for s in seen if s["state"] == "running"]
        assert running and all(s["name"] != "(waiting for an agent)" for s in running)  # the title never contradicts the badge
        before = watch(page, lambda now: step(now) > step(seen[-1]) and now["log"] != seen[-1]["log"], 30, "the step and log moving")[-1]
        assert before["epoch"] == "1 / 1" and step(before) < 18 and before["step"].endswith(" / 18") and "train" in before["log"]
        screenshot = shot(page, tmp_path, "9-live-run-mid-epoch")
        print(f"live run page mid-epoch: {screenshot}")

        server.stop()  # the page keeps trying, less often, and says so
        watch(page, lambda now: now["waiting"], 30, "that the dashboard did not answer")
        server.start()  # same port, same database
        watch(page, lambda now: not now["waiting"] and step(now) > step(before) and now["log"] != before["log"], 60, "it moving again")
        fast_forward.touch()  # the curves have grown live: the rest of the run need not be watched step by step

        expect(page.locator("#run-state")).to_contain_text("succeeded", timeout=120_000)
        expect(page.locator("#progress")).to_contain_text("test_acc@1")  # test metrics and figures came without a reload
        matrix = page.locator("img#confusion-matrix")
        expect(matrix).to_be_visible()
        expect(page.locator("#queue")).to_contain_text("succeeded")
        expect(page.locator("#where")).to_contain_text("browser-agent")
        expect(page.locator("#log-tail pre.log")).to_contain_text("done: best")
        final = shown(page)
        with server.client() as api:
            assert final["name"] == api.get(f"/api/v1/runs/{run_id}").json()["name"]
        assert final["epoch"] == "1 / 1" and final["step"] == "18 / 18"
        attempt_log = page.locator("#log-files a", has_text="attempt-1.log")  # every attempt's output stays reachable
        assert "done: best" in page.request.get(attempt_log.get_attribute("href")).text()
        expect(page.locator("#chart-val-loss .uplot")).to_be_visible()
        pixels = page.evaluate(SERIES_PIXELS)
        assert pixels["middle"] >= 20, pixels  # the single evaluation is a visible point, in the middle of its axis
        shot(page, tmp_path, "10-run-on-an-agent")
    finally:
        agent.terminate()  # SIGTERM: nothing runs any more, so it exits at once
        agent.wait(timeout=30)
    assert page.evaluate("() => window.notReloaded") is True
    assert page.errors == []


def test_run_table_sorts_filters_tags_and_clones(page, server, root, tmp_path):
    """Add parameter columns (remembered), sort by a click, filter by an expression, tag the ticked runs, clone one with
    an edit checked as it is typed, and queue it; archive a project and delete a run with its folders, confirmed."""
    page.goto("/web/runs")
    for column in ("train.seed", "optim.lr", "val_acc@1"):
        page.fill("#column-input", column)
        page.click("#picker button")
        expect(page.locator(f'th[data-column="{column}"]')).to_be_visible()
    page.goto("/web/runs")  # no ?columns=: the page opens with the ones this browser remembers
    expect(page.locator('th[data-column="train.seed"]')).to_be_visible()
    page.click('th[data-column="train.seed"] a')  # descending first
    seeds = page.locator("#run-table tbody tr td:nth-child(12)").all_inner_texts()
    numbers = [int(s) for s in seeds if s != "-"]
    assert numbers == sorted(numbers, reverse=True) and {1, 2} <= set(numbers), seeds
    assert seeds[len(numbers) :] == ["-"] * (len(seeds) - len(numbers))  # runs without the key come last
    page.fill('input[name="where"]', "train.seed == 1 and val_acc@1 >= 0")
    page.click("#filters button[type=submit]")
    expect(page.locator("#run-table tbody tr").first).to_be_visible()
    assert set(page.locator("#run-table tbody tr td:nth-child(12)").all_inner_texts()) == {"1"}
    page.fill('input[name="where"]', "train.seed ==")
    page.click("#filters button[type=submit]")
    expect(page.locator("#filter-error")).to_contain_text("where: expected a number")
    page.fill('input[name="where"]', "")
    page.click("#filters button[type=submit]")
    page.check("#tick-all")
    page.fill('#ticked input[name="tag"]', "reviewed")
    page.click('#ticked button[value="add"]')
    expect(page.locator(".chips a.chip", has_text="reviewed")).to_be_visible()
    picture = shot(page, tmp_path, "run-table")
    if os.environ.get("UTP_RUN_TABLE_SHOT"):  # where a person wants to look at it
        shutil.copy(picture, os.environ["UTP_RUN_TABLE_SHOT"])
    page.locator("#run-table tbody tr td:nth-child(2) a").first.click()
    page.click("#clone-link")
    page.fill("#overrides", "optim.lr=0.5\ntrain.epochs=1")
    expect(page.locator("#clone-status")).to_contain_text("OK: ")
    expect(page.locator("#clone-diff")).to_contain_text("optim.lr")
    page.fill("#overrides", "optim.lrr=0.5")
    expect(page.locator("#clone-status")).to_contain_text("optim.lrr")
    expect(page.locator("#clone-queue")).to_be_disabled()
    page.fill("#overrides", "optim.lr=0.5")
    expect(page.locator("#clone-queue")).to_be_enabled()
    page.fill('input[name="priority"]', "7")
    page.click("#clone-queue")
    expect(page.locator("#run-state")).to_contain_text("queued")
    page.click('#queue button:has-text("Cancel")')
    expect(page.locator("#run-state")).to_contain_text("cancelled")

    page.goto("/web/projects")
    project = page.locator("tr.project").first
    name = project.get_attribute("data-project")
    project.locator('button[name="archived"]').click()
    expect(page.locator(f'tr.project[data-project="{name}"]')).to_have_count(0)
    page.click("#show-archived")
    page.locator(f'tr.project[data-project="{name}"] button[name="archived"]').click()  # unarchive
    page.goto("/web/projects")
    expect(page.locator(f'tr.project[data-project="{name}"]')).to_have_count(1)

    with server.client() as api:
        doomed = next(r for r in api.get("/api/v1/runs", params={"state": "succeeded", "limit": 50}).json() if r["source"] == "disk")
    folder = root / "logs" / doomed["dataset"] / doomed["name"]
    page.goto(f"/web/runs/{doomed['id']}")
    page.click("#delete-link")
    expect(page.locator("#run-folders")).to_contain_text(str(folder))
    page.check("#delete-files")
    page.fill("#confirm-name", "not-its-name")
    page.click("#delete-run-button")
    expect(page.locator("#delete-error")).to_contain_text("nothing was deleted")
    assert folder.is_dir()
    page.check("#delete-files")
    page.fill("#confirm-name", doomed["name"])
    page.click("#delete-run-button")
    expect(page).to_have_url(re.compile(r"/web/runs(\?.*)?$"))  # the table, with the columns this browser remembers
    assert not folder.exists()
    with server.client() as api:
        assert api.get(f"/api/v1/runs/{doomed['id']}").status_code == 404
    assert page.errors == [], page.errors
