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

  // few points are always dotted: a line of one point is no line at all (uPlot's own rule hides dots that crowd)
  const sparse = (u) => u.data[0].length <= 30;

  // epochs count from 1 on the pages, as on the console ("epoch 1/3"); metrics.jsonl and the API count from 0
  const oneBased = (curve) => curve && { x: curve.x.map((epoch) => epoch + 1), y: curve.y };

  function chart(el, title, xLabel, names, data) {
    if (!el) return null;
    el.textContent = "";
    if (!data[0].length) {
      el.innerHTML = `<p class="empty">${title}: no points yet</p>`;
      return null;
    }
    const opts = {
      title, width: Math.max(360, el.clientWidth - 12), height: 260,
      // one x value (a single evaluation): uPlot would span it from x - 1 to x + 1 (an "epoch 0"); half a unit each
      // side puts its point in the middle, above its own tick and no other
      scales: { x: { time: false, range: (u, min, max) => (u.data[0].length === 1 ? [u.data[0][0] - 0.5, u.data[0][0] + 0.5] : [min, max]) } },
      // epochs and steps are whole numbers: no 0.2-epoch ticks
      axes: [{ label: xLabel, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000] }, {}],
      cursor: { drag: { x: true, y: false } },
      series: [{ label: xLabel }, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { size: 7, fill: COLORS[i % COLORS.length], show: sparse } }))],
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

  function comparePage(labels, series) {
    const select = document.getElementById("metric");
    const metrics = [...new Set(series.flatMap((s) => Object.keys(s.val)))].sort();
    for (const m of metrics) select.add(new Option(m, m, false, m === "val_acc@1"));
    const el = document.getElementById("chart-compare-val");
    let plot = null;
    const draw = () => {
      if (plot) plot.destroy();
      plot = chart(el, `${select.value} per epoch`, "epoch", labels, align(series.map((s) => oneBased(s.val[select.value]))));
    };
    select.addEventListener("change", draw);
    draw();
    chart(document.getElementById("chart-compare-train"), "train loss per step", "step", labels, align(series.map((s) => s.train.train_loss)));
  }

  // a page whose tables change while tasks run (the sweep board): fetch it again and swap only those tables
  async function swapParts(ids) {
    const response = await fetch(location.pathname, { credentials: "same-origin" });
    if (!response.ok) return;
    swapIn(new DOMParser().parseFromString(await response.text(), "text/html"), ids);
  }

  // the elements with these ids, as `fresh` (the page as the server renders it now) has them, where they changed
  function swapIn(fresh, ids) {
    for (const id of ids) {
      const [now, next] = [document.getElementById(id), fresh.getElementById(id)];
      if (!now || !next || now.innerHTML === next.innerHTML) continue;
      const log = now.querySelector("pre.log");
      const [atEnd, scrolled] = log ? [log.scrollTop + log.clientHeight >= log.scrollHeight - 4, log.scrollTop] : [true, 0];
      now.innerHTML = next.innerHTML;
      const grown = now.querySelector("pre.log");
      if (grown) grown.scrollTop = atEnd ? grown.scrollHeight : scrolled; // follow a log unless the user scrolled up to read
    }
  }

  function refreshTables(ids, seconds) {
    setInterval(() => swapParts(ids), seconds * 1000);
  }

  return { align, chart, liveChart, oneBased, comparePage, refreshTables, swapIn };
})();

// What a page starts comes from its data, not from inline scripts, which the Content-Security-Policy forbids
document.addEventListener("DOMContentLoaded", () => {
  const compare = document.getElementById("compare-data");
  if (compare) {
    const { labels, series } = JSON.parse(compare.textContent);
    utp.comparePage(labels, series);
  }
  const board = document.querySelector("[data-refresh-tables]");
  if (board) utp.refreshTables(board.dataset.refreshTables.split(" "), Number(board.dataset.refreshSeconds));
});
