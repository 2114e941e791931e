// The clone editor checks the typed changes as the user types (a quarter second after the last key), with the same
// code and one-line messages as the command line, and shows what the clone changes against the run.
"use strict";
(() => {
  const form = document.getElementById("clone-form");
  const text = document.getElementById("overrides");
  const status = document.getElementById("clone-status");
  const diff = document.getElementById("clone-diff");
  const submit = document.getElementById("clone-queue");
  let timer = null, asked = 0;

  async function check() {
    const mine = ++asked;
    const url = `${form.dataset.check}?${new URLSearchParams({ overrides: text.value })}`;
    let answer;
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      answer = await response.json();
    } catch (err) {
      answer = { ok: false, detail: "the dashboard did not answer; the changes are checked again when it does", changes: {} };
    }
    if (mine !== asked) return; // an older answer arriving late
    status.textContent = answer.ok ? `OK: ${Object.keys(answer.changes).length} key(s) differ from the run.` : answer.detail;
    status.className = answer.ok ? "notice" : "error";
    submit.disabled = !answer.ok;
    const body = diff.querySelector("tbody");
    body.replaceChildren();
    for (const [key, [before, after]] of Object.entries(answer.changes)) {
      const row = body.insertRow();
      for (const cell of [key, JSON.stringify(before), JSON.stringify(after)]) row.insertCell().textContent = cell;
    }
    diff.hidden = !Object.keys(answer.changes).length;
  }

  text.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(check, 250);
  });
  check();
})();
