// Charts of the dashboard, drawn with the vendored uPlot. Live pages poll the API and call setData(data, false),
// which keeps the user's zoom (scales) and the series they switched off in the legend.
"use strict";
const utp = (() => {
  const COLORS = ["#2458c4", "#d1495b", "#00798c", "#edae49", "#66a182", "#8d6a9f", "#30638e", "#e07a5f", "#3d405b", "#81b29a", "#f2cc8f", "#6d597a"];

  // several {x, y} curves on one x axis: [xs, ys1, ys2, ...] with null where a curve has no point
  function align(curves) {
    const xs = [...new Set(curves.flatMap((c) => (c ? c.x : [])))].sort((a, b) => a - b);
    const columns = curves.map((c) => {
      const at = new Map(c ? c.x.map((x, i) => [x, c.y[i]]) : []);
      return xs.map((x) => (at.has(x) ? at.get(x) : null));
    });
    return [xs, ...columns];
  }

  function chart(el, title, xLabel, names, data) {
    if (!el) return null;
    el.textContent = "";
    if (!data[0].length) {
      el.innerHTML = `<p class="empty">${title}: no points yet</p>`;
      return null;
    }
    const opts = {
      title, width: Math.max(360, el.clientWidth - 12), height: 260,
      scales: { x: { time: false } },
      // epochs and steps are whole numbers: no 0.2-epoch ticks
      axes: [{ label: xLabel, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000] }, {}],
      cursor: { drag: { x: true, y: false } },
      series: [{ label: xLabel }, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { size: 5 } }))],
    };
    return new uPlot(opts, data, el);
  }

  // one chart that can be refreshed: created on the first points, then only fed new data
  function liveChart(el, title, xLabel) {
    let plot = null, names = null;
    const update = (curveNames, curves) => {
      const data = align(curves);
      if (plot && names && names.join() === curveNames.join()) {
        const xs = plot.data[0];
        const zoomed = xs.length && (plot.scales.x.min > xs[0] || plot.scales.x.max < xs[xs.length - 1]);
        plot.setData(data, !zoomed); // zoomed in: keep the user's window; else grow with the new points
        return;
      }
      if (plot) plot.destroy();
      names = curveNames;
      plot = chart(el, title, xLabel, curveNames, data);
    };
    update.plot = () => plot;
    return update;
  }

  function runPage(runId, live) {
    const train = liveChart(document.getElementById("chart-train"), "train loss per step", "step");
    const valLoss = liveChart(document.getElementById("chart-val-loss"), "val loss per epoch", "epoch");
    const val = liveChart(document.getElementById("chart-val"), "val metrics per epoch", "epoch");
    async function update() {
      const response = await fetch(`/api/v1/runs/${runId}/series?log=true`, { credentials: "same-origin" });
      if (!response.ok) return null;
      const s = await response.json();
      train(["train loss"], [s.train.train_loss]);
      valLoss(["val_loss"], [s.val.val_loss]);
      const metrics = Object.keys(s.val).filter((k) => k !== "val_loss");
      val(metrics, metrics.map((k) => s.val[k]));
      const epochStep = document.getElementById("epoch-step");
      if (epochStep) epochStep.textContent = `${s.epoch ?? "-"} / ${s.step ?? "-"}`;
      const best = document.getElementById("best");
      if (best && s.best !== null) best.textContent = Number(s.best).toPrecision(4);
      const log = document.querySelector("pre.log");
      if (log && s.log !== undefined && log.textContent !== s.log) {
        const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.textContent = s.log;
        if (atEnd) log.scrollTop = log.scrollHeight; // follow the log unless the user scrolled up to read
      }
      const state = document.querySelector("#run-state .state");
      if (state && state.textContent !== s.state) {
        state.textContent = s.state;
        state.className = `state state-${s.state}`;
        swapParts(RUN_PARTS); // a new state: where it runs, its queue entry, files and log change with it
      }
      return s.state;
    }
    const ACTIVE = ["queued", "claimed", "running", "stopping"];
    const RUN_PARTS = ["run-name", "where", "queue", "files", "log-tail"];
    (async function poll() {
      const state = await update();
      if (live || ACTIVE.includes(state)) setTimeout(poll, 3000);
    })();
  }

  function comparePage(labels, series) {
    const select = document.getElementById("metric");
    const metrics = [...new Set(series.flatMap((s) => Object.keys(s.val)))].sort();
    for (const m of metrics) select.add(new Option(m, m, false, m === "val_acc@1"));
    const el = document.getElementById("chart-compare-val");
    let plot = null;
    const draw = () => {
      if (plot) plot.destroy();
      plot = chart(el, `${select.value} per epoch`, "epoch", labels, align(series.map((s) => s.val[select.value])));
    };
    select.addEventListener("change", draw);
    draw();
    chart(document.getElementById("chart-compare-train"), "train loss per step", "step", labels, align(series.map((s) => s.train.train_loss)));
  }

  // a page whose tables change while tasks run (the sweep board): fetch it again and swap only those tables
  // the elements with these ids, as the server renders this page now (parts of a page kept fresh without a reload)
  async function swapParts(ids) {
    const response = await fetch(location.pathname, { credentials: "same-origin" });
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const id of ids) {
      const [now, next] = [document.getElementById(id), fresh.getElementById(id)];
      if (now && next && now.innerHTML !== next.innerHTML) now.innerHTML = next.innerHTML;
    }
  }

  function refreshTables(ids, seconds) {
    setInterval(() => swapParts(ids), seconds * 1000);
  }

  return { align, chart, liveChart, runPage, comparePage, refreshTables };
})();

// What a page starts comes from its data, not from inline scripts, which the Content-Security-Policy forbids
document.addEventListener("DOMContentLoaded", () => {
  const run = document.getElementById("run-page");
  if (run) utp.runPage(Number(run.dataset.runId), run.dataset.live === "true");
  const compare = document.getElementById("compare-data");
  if (compare) {
    const { labels, series } = JSON.parse(compare.textContent);
    utp.comparePage(labels, series);
  }
  const board = document.querySelector("[data-refresh-tables]");
  if (board) utp.refreshTables(board.dataset.refreshTables.split(" "), Number(board.dataset.refreshSeconds));
});
