"use strict";
// The entry browser: a stage's stream, priority lane or dead letters a page at a time
// (all entries newest first, or the pending ones oldest first), each with its state
// in the consumer group; and any entry found by its id. Read-only.
// GET api/stages/{stage}/entries?lane=&view=&shard=&cursor=, GET api/entries/{id}.
(() => {
  const { $, kit, cursorPager } = window.consoleLib;
  let pager = null;
  let stagesRead = false;
  let asked = 0;  // the newest request: an older answer arriving late is dropped

  function stateText(e) {
    if (e.state === "pending") {
      return "pending on " + e.consumer + " \u00b7 " + e.deliveries + " deliveries (" + e.counted + " counted) \u00b7 idle " + kit().age(e.idle_ms / 1000);
    }
    if (e.state === "dead") return e.category + " after " + e.deliveries + " deliveries: " + e.error;
    return e.state;
  }

  function rows(entries, withPlace) {
    const { el, timeEl } = kit();
    return entries.map((e) => {
      const detail = el("details", {}, el("summary", { text: "fields" }),
        el("pre", { class: "fields", text: e.fields === null ? "(gone from the stream: trimmed or deleted)" : pretty(e.fields) }));
      const cells = [
        el("td", { class: "id", "data-field": "id", text: e.id }),
        el("td", { class: "id" }, timeEl(e.at_ms)),
        el("td", { text: e.type || "\u2014" }),
        el("td", { class: "id", text: e.tracker_id || "" }),
        el("td", {}, el("span", { class: "tag", "data-state": e.state, text: e.state })),
        el("td", { class: "wrap", text: e.state === "done" || e.state === "waiting" ? "" : stateText(e) }),
        el("td", { class: "error" }, detail),
      ];
      if (withPlace) cells.unshift(el("td", { text: e.stage + (e.shard ? "." + e.shard : "") + " / " + e.lane }));
      return el("tr", { "data-entry-id": e.id, "data-state": e.state }, ...cells);
    });
  }

  function pretty(fields) {
    const out = Object.assign({}, fields);
    if (out.data) { try { out.data = JSON.parse(out.data); } catch (err) { /* shown as stored */ } }
    return JSON.stringify(out, null, 2);
  }

  async function readStages() {
    if (stagesRead) return;
    const { el, getJson } = kit();
    const body = await getJson("api/stages");
    const select = $("#entries-stage");
    const chosen = select.value;
    select.replaceChildren(...body.stages.map((s) => el("option", { value: s.stage, text: s.stage, "data-shards": String(s.shards) })));
    if (chosen) select.value = chosen;
    shards();
    stagesRead = true;
  }

  function shards() {
    const { el } = kit();
    const opt = $("#entries-stage").selectedOptions[0];
    const n = opt ? Number(opt.dataset.shards) : 1;
    const select = $("#entries-shard");
    select.replaceChildren(...Array.from({ length: n }, (_, i) => el("option", { value: String(i), text: String(i) })));
    $("#entries-shard-label").hidden = n <= 1;
  }

  async function page(cursor) {
    const { getJson, num } = kit();
    const stage = $("#entries-stage").value;
    if (!stage) return;
    const lane = $("#entries-lane").value, view = lane === "dlq" ? "all" : $("#entries-view").value;
    $("#entries-view").disabled = lane === "dlq";
    const p = new URLSearchParams({ lane, view, shard: $("#entries-shard").value || "0" });
    if (cursor) p.set("cursor", cursor);
    const mine = ++asked;
    let body;
    try {
      body = await getJson("api/stages/" + encodeURIComponent(stage) + "/entries?" + p);
      if (mine !== asked) return;
      $("#entries-error").hidden = true;
    } catch (err) {
      $("#entries-error").hidden = false;
      $("#entries-error").textContent = "Could not read the entries: " + err.message;
      $("#entries-table").hidden = true;
      $("#entries-empty").hidden = true;
      return;
    }
    $("#entries-found").hidden = true;
    $("#entries-summary").textContent = body.stream + ": " + num.format(body.length) + " entries" +
      (lane === "dlq" ? "" : ", " + num.format(body.pending) + " pending") +
      (view === "pending" ? " \u00b7 pending entries, oldest first" : " \u00b7 newest first");
    $("#entry-rows").replaceChildren(...rows(body.entries, false));
    const empty = $("#entries-empty");
    empty.removeAttribute("data-loading");
    empty.textContent = view === "pending" ? "Nothing pending in this lane." : "This lane is empty.";
    empty.hidden = body.entries.length > 0;
    $("#entries-table").hidden = body.entries.length === 0;
    if (view === "pending") pager.labels("\u2190 Previous", "Next \u2192"); else pager.labels("\u2190 Newer", "Older \u2192");
    pager.show(body.next, body.entries.length + " shown");
  }

  async function find() {
    const { el, getJson } = kit();
    const id = $("#entries-id").value.trim();
    if (!id) return;
    const box = $("#entries-found");
    box.hidden = false;
    const everywhere = $("#entries-everywhere").checked;
    const p = everywhere ? "" : "?" + new URLSearchParams({ stage: $("#entries-stage").value });
    try {
      const body = await getJson("api/entries/" + encodeURIComponent(id) + p);
      const head = el("thead", {}, el("tr", {}, ...["where", "id", "added", "type", "tracker", "state", "delivery", ""].map((c) => el("th", { text: c }))));
      box.replaceChildren(
        el("p", { "data-field": "found", text: body.found.length
          ? body.found.length + " entr" + (body.found.length === 1 ? "y" : "ies") + " with id " + body.id
          : "No entry " + body.id + (everywhere ? " in any stage" : " in " + $("#entries-stage").value) + " (never added, or trimmed)." }),
        body.found.length ? el("table", { id: "entries-found-table" }, head, el("tbody", {}, ...rows(body.found, true))) : "");
    } catch (err) {
      box.replaceChildren(el("p", { class: "error-text", text: "Find failed: " + err.message }));
    }
  }

  async function load(arg) {
    if (!pager) pager = cursorPager($("#entries-pager"), page);
    try { await readStages(); } catch (err) {
      $("#entries-error").hidden = false;
      $("#entries-error").textContent = "Could not read the stages: " + err.message;
      return;
    }
    if (arg && arg !== $("#entries-stage").value) { $("#entries-stage").value = arg; shards(); pager.reset(); }
    await page(pager.cursor());
  }
  function again() { pager.reset(); page(null); }
  document.addEventListener("DOMContentLoaded", () => {
    $("#entries-stage").addEventListener("change", () => { shards(); again(); });
    for (const id of ["#entries-shard", "#entries-lane", "#entries-view"]) $(id).addEventListener("change", again);
    $("#entries-refresh").addEventListener("click", () => page(pager.cursor()));
    $("#entries-find").addEventListener("submit", (ev) => { ev.preventDefault(); find(); });
  });
  window.consolePages.entries = { load, refreshMs: null };
})();
