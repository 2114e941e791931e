// The run table's columns: the config keys and metrics a user adds are kept in this browser (localStorage) and put
// in the page's ?columns= whenever it is opened without one; the header's × takes a column away again.
"use strict";
(() => {
  const KEY = "utp.runtable.columns";
  const table = document.getElementById("run-table");
  const params = new URLSearchParams(location.search);
  const shown = (table.dataset.columns || "").split(",").filter(Boolean);
  const saved = (localStorage.getItem(KEY) || "").split(",").filter(Boolean);

  function open(columns) {
    localStorage.setItem(KEY, columns.join(","));
    if (columns.length) params.set("columns", columns.join(","));
    else params.delete("columns");
    params.delete("page");
    location.search = params.toString();
  }

  if (!params.has("columns") && saved.length && saved.join(",") !== shown.join(",")) {
    open(saved); // the user's own columns, remembered from the last visit
    return;
  }
  if (params.has("columns")) localStorage.setItem(KEY, shown.join(","));

  document.getElementById("picker").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = document.getElementById("column-input").value.trim();
    if (name && !shown.includes(name)) open([...shown, name]);
  });
  for (const button of table.querySelectorAll("button.drop")) {
    button.addEventListener("click", () => open(shown.filter((c) => c !== button.dataset.column)));
  }
  document.getElementById("tick-all").addEventListener("change", (event) => {
    for (const box of table.querySelectorAll("input.tick")) box.checked = event.target.checked;
  });
})();
