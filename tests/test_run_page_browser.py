"""The run page in a real headless Chromium: system charts, the predictions gallery and its filters, the chart
controls (x axis, smoothing, log scale) on the run and compare pages, all under the strict Content-Security-Policy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from dashboard_support import logged_in_page, private_root, serving
from playwright.sync_api import expect

SCREENSHOT = os.environ.get("UTP_RUN_PAGE_SCREENSHOT")  # where to keep the run page's picture, when asked


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(private_root(tmp_path_factory, "run-page"), tmp_path_factory, "run-page-db") as running:
        yield running


@pytest.fixture(scope="module")
def page(server):
    with logged_in_page(server) as page:
        yield page


def finished(server) -> list[dict]:
    with server.client() as client:
        return [r for r in client.get("/api/v1/runs", params={"state": "succeeded"}).json() if r["source"] == "disk"]


def test_system_charts_gallery_filters_and_chart_controls(page, server, tmp_path):
    run = finished(server)[0]
    page.goto(f"/web/runs/{run['id']}")
    expect(page.locator("#chart-system-ram_mb .uplot")).to_be_visible()  # CPU and RAM of a CPU run
    expect(page.locator("#chart-system-cpu_percent .uplot")).to_be_visible()
    assert page.locator("#chart-system-util").count() == 0  # no GPU chart at all, not a flat line at zero

    tiles = page.locator("#predictions .tile")
    total = tiles.count()
    assert total == 24 and tiles.first.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
    page.select_option("#filter-true", "dog")
    shown = page.locator("#predictions .tile:visible")
    assert shown.count() == 8 and set(shown.evaluate_all("ts => ts.map(t => t.dataset.true)")) == {"dog"}
    assert page.locator("#gallery-count").inner_text() == "8"
    page.check("#filter-wrong")
    assert all(w for w in shown.evaluate_all("ts => ts.map(t => t.classList.contains('wrong'))"))
    page.uncheck("#filter-wrong")
    page.select_option("#filter-true", "")
    expect(page.locator("#per-class")).to_contain_text("precision")

    expect(page.locator("#chart-train .u-title")).to_have_text("train loss per step")  # each chart's own axis
    expect(page.locator("#chart-val .u-title")).to_have_text("val metrics per epoch")
    page.select_option("#chart-axis", "time")
    expect(page.locator("#chart-train .u-title")).to_contain_text("per wall time")
    expect(page.locator("#chart-val .u-title")).to_contain_text("per wall time")
    page.select_option("#chart-axis", "epoch")
    expect(page.locator("#chart-train .u-title")).to_contain_text("per epoch")
    page.fill("#chart-smooth", "0.9")
    page.dispatch_event("#chart-smooth", "input")
    expect(page.locator("#chart-smooth-value")).to_have_text("0.90")
    page.check("#chart-log")
    expect(page.locator("#chart-train .uplot")).to_be_visible()
    page.select_option("#chart-axis", "")
    page.fill("#chart-smooth", "0")
    page.dispatch_event("#chart-smooth", "input")
    page.uncheck("#chart-log")
    # tick labels: as many decimals as the step needs (a loss moving in its 4th decimal once got 5 ticks alike)
    labels = "splits => utp.tickLabels({scales: {y: {}}}, splits)"
    assert page.evaluate(labels, [1.107, 1.1075, 1.108, 1.1085, 1.109]) == ["1.1070", "1.1075", "1.1080", "1.1085", "1.1090"]
    assert page.evaluate(labels, [0, 0.25, 0.5, 0.75]) == ["0.00", "0.25", "0.50", "0.75"]
    assert page.evaluate(labels, [0, 20, 40]) == ["0", "20", "40"]
    assert page.evaluate("s => utp.tickLabels({scales: {y: {distr: 3}}}, s)", [0.01, 0.1, 1, 10]) == ["0.01", "0.1", "1", "10"]
    path = tmp_path / "run-page.png"
    page.screenshot(path=str(path), full_page=True)
    if SCREENSHOT:
        shutil.copyfile(path, Path(SCREENSHOT))
    assert not page.errors, page.errors


def test_compare_takes_every_run_picked_with_the_same_controls(page, server):
    runs = finished(server)
    ids = "&".join(f"ids={r['id']}" for r in runs)
    page.goto(f"/web/compare?{ids}")
    expect(page.locator("h1")).to_have_text(f"Compare {len(runs)} runs")
    expect(page.locator("#chart-compare-val .uplot")).to_be_visible()
    page.select_option("#chart-axis", "step")
    expect(page.locator("#chart-compare-val .u-title")).to_contain_text("per step")
    page.check("#chart-log")
    expect(page.locator("#chart-compare-train .uplot")).to_be_visible()
    assert "output.run_name" not in page.locator("#differences").inner_text()
    assert not page.errors, page.errors
