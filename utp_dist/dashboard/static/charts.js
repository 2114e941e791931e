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

  // the chart controls of a page (x axis, EMA smoothing, log scale), when it has them
  const AXIS_LABELS = { step: "step", epoch: "epoch", time: "wall time (s)" };
  function controls() {
    const axis = document.getElementById("chart-axis"), smooth = document.getElementById("chart-smooth"), log = document.getElementById("chart-log");
    return { axis: axis ? axis.value : "", smooth: smooth ? Number(smooth.value) : 0, log: Boolean(log && log.checked) };
  }
  function onControls(redraw) {
    for (const id of ["chart-axis", "chart-smooth", "chart-log"]) {
      const el = document.getElementById(id);
      if (el) el.addEventListener("input", () => {
        const shown = document.getElementById("chart-smooth-value");
        if (shown) shown.textContent = controls().smooth.toFixed(2);
        redraw();
      });
    }
  }

  // TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to zero
  function smoothed(ys, weight) {
    if (!weight) return ys;
    let last = 0, n = 0;
    return ys.map((y) => {
      if (y === null || y === undefined || !Number.isFinite(y)) return y;
      n += 1;
      last = last * weight + (1 - weight) * y;
      return last / (1 - Math.pow(weight, n));
    });
  }

  // one curve as the controls want it: x on the chosen axis (its plain x when it lacks that one), y smoothed,
  // and only positive values on a log scale
  function view(curve, natural, opts) {
    if (!curve) return curve;
    const axis = opts.axis || natural;
    const xs = curve[axis] || curve.x;
    const ys = smoothed(curve.y, opts.smooth);
    const x = [], y = [];
    xs.forEach((value, i) => {
      if (value === null || value === undefined) return;
      x.push(value);
      y.push(opts.log && !(ys[i] > 0) ? null : ys[i]);
    });
    return { x, y };
  }

  // y tick labels with as many decimals as their step needs: uPlot's default keeps at most 3, so a loss moving in its
  // 4th decimal got five ticks all labelled 1.108 or 1.109; on a log scale (steps vary) 4 significant digits each
  function tickLabels(u, splits) {
    const step = splits.length > 1 ? Math.abs(splits[1] - splits[0]) : 0;
    if (u.scales.y.distr === 3 || !(step > 0)) return splits.map((v) => (v === null ? "" : String(Number(v.toPrecision(4)))));
    let decimals = Math.max(0, Math.ceil(-Math.log10(step) - 1e-9));
    if (Math.abs(Number(step.toFixed(decimals)) - step) > step * 1e-6) decimals += 1; // 0.25 needs 2, not 1
    return splits.map((v) => (v === null ? "" : v.toFixed(Math.min(decimals, 12))));
  }

  // the y axis as wide as its longest label (uPlot's fixed 50 px cut "1.1085" to ".1085"), as uPlot's axis-autosize demo
  function tickSpace(u, values, axisIdx, cycleNum) {
    const axis = u.axes[axisIdx];
    if (cycleNum > 1) return axis._size; // uPlot asks again while sizes settle: keep the last answer
    const longest = (values || []).reduce((acc, v) => (v && v.length > acc.length ? v : acc), "");
    u.ctx.font = axis.font[0];
    return Math.ceil(axis.ticks.size + axis.gap + (longest ? u.ctx.measureText(longest).width / devicePixelRatio : 0));
  }

  function chart(el, title, xLabel, names, data, log = false) {
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
      scales: {
        x: { time: false, range: (u, min, max) => (u.data[0].length === 1 ? [u.data[0][0] - 0.5, u.data[0][0] + 0.5] : [min, max]) },
        y: log ? { distr: 3 } : {},
      },
      // epochs and steps are whole numbers: no 0.2-epoch ticks
      axes: [{ label: xLabel, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000] }, { values: tickLabels, size: tickSpace }],
      cursor: { drag: { x: true, y: false } },
      series: [{ label: xLabel }, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { size: 7, fill: COLORS[i % COLORS.length], show: sparse } }))],
    };
    return new uPlot(opts, data, el);
  }

  // one chart that can be refreshed: created on the first points, then only fed new data; `natural`: the x axis of
  // its curves when the controls leave it to the chart ("step" or "epoch")
  function liveChart(el, title, natural) {
    let plot = null, key = null;
    const update = (curveNames, curves) => {
      const opts = controls();
      const axis = opts.axis || natural;
      const data = align(curves.map((c) => view(c, natural, opts)));
      const nextKey = [curveNames.join(), axis, opts.log].join("|");
      if (plot && key === nextKey) {
        const xs = plot.data[0];
        const zoomed = xs.length && (plot.scales.x.min > xs[0] || plot.scales.x.max < xs[xs.length - 1]);
        plot.setData(data, !zoomed); // zoomed in: keep the user's window; else grow with the new points
        return;
      }
      if (plot) plot.destroy();
      key = nextKey;
      plot = chart(el, `${title} per ${AXIS_LABELS[axis].split(" (")[0]}`, AXIS_LABELS[axis], curveNames, data, opts.log);
    };
    update.plot = () => plot;
    return update;
  }

  function comparePage(labels, series) {
    const select = document.getElementById("metric");
    const metrics = [...new Set(series.flatMap((s) => Object.keys(s.val)))].sort();
    for (const m of metrics) select.add(new Option(m, m, false, m === "val_acc@1"));
    const val = liveChart(document.getElementById("chart-compare-val"), "val metric", "epoch");
    const train = liveChart(document.getElementById("chart-compare-train"), "train loss", "step");
    const draw = () => {
      val(labels.map((l) => `${l} ${select.value}`), series.map((s) => s.val[select.value]));
      train(labels, series.map((s) => s.train.train_loss));
    };
    select.addEventListener("change", draw);
    onControls(draw);
    draw();
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

  return { align, chart, controls, liveChart, onControls, oneBased, comparePage, refreshTables, smoothed, swapIn, tickLabels };
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
