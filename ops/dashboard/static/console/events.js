"use strict";
// The events log: geofence enter/exit events newest first, filtered by tracker,
// geofence, kind and time (GET api/events), a page at a time by cursor.
(() => {
  const { $, kit, cursorPager } = window.consoleLib;
  let pager = null;
  let asked = 0;  // the newest request: an older answer arriving late is dropped

  function filters() {
    const p = new URLSearchParams();
    for (const [name, id] of [["tracker", "#events-tracker"], ["fence", "#events-fence"], ["kind", "#events-kind"],
      ["since", "#events-since"], ["until", "#events-until"]]) {
      const v = $(id).value.trim();
      if (v) p.set(name, v);
    }
    return p;
  }

  async function page(cursor) {
    const { el, getJson, timeEl } = kit();
    const p = filters();
    if (cursor) p.set("before", cursor);
    const mine = ++asked;
    let body;
    try {
      body = await getJson("api/events?" + p);
      if (mine !== asked) return;
      $("#events-error").hidden = true;
    } catch (err) {
      $("#events-error").hidden = false;
      $("#events-error").textContent = "Could not load events: " + err.message;
      $("#events-table").hidden = true;  // rows of another filter would mislead
      $("#events-empty").hidden = true;
      return;
    }
    $("#events-fences").replaceChildren(...body.geofences.map((g) => el("option", { value: g.name })));
    $("#event-rows").replaceChildren(...body.events.map((e) => {
      const tracker = el("button", { class: "link", type: "button", text: e.tracker_id, title: "only this tracker's events" });
      tracker.addEventListener("click", () => { $("#events-tracker").value = e.tracker_id; apply(); });
      const fence = el("button", { class: "link", type: "button", text: e.geofence, title: "only this geofence's events" });
      fence.addEventListener("click", () => { $("#events-fence").value = String(e.geofence_id); apply(); });
      const trace = el("button", { class: "link", type: "button", text: "trace" });
      trace.addEventListener("click", () => { location.hash = "#trace/" + encodeURIComponent(e.tracker_id); });
      return el("tr", { "data-event": String(e.id), "data-kind": e.kind },
        el("td", { class: "id" }, timeEl(e.observed_at)),
        el("td", {}, el("span", { class: "tag", "data-kind": e.kind, text: e.kind })),
        el("td", { class: "id" }, tracker), el("td", { text: e.tracker || "" }),
        el("td", {}, fence),
        el("td", { class: "id" }, e.report_at ? timeEl(e.report_at) : "\u2014"),
        el("td", {}, trace));
    }));
    const empty = $("#events-empty");
    empty.removeAttribute("data-loading");
    empty.textContent = "No events match" + (body.since ? " since " + body.since : "") + ".";
    empty.hidden = body.events.length > 0;
    $("#events-table").hidden = body.events.length === 0;
    pager.show(body.next, body.events.length + " event(s)" + (body.since ? " since " + body.since : ", all time"));
  }

  function apply() { pager.reset(); page(null); }
  async function load() {
    if (!pager) pager = cursorPager($("#events-pager"), page);
    await page(pager.cursor());
  }
  document.addEventListener("DOMContentLoaded", () => {
    $("#events-form").addEventListener("submit", (ev) => { ev.preventDefault(); apply(); });
    $("#events-clear").addEventListener("click", () => {
      for (const id of ["#events-tracker", "#events-fence", "#events-until"]) $(id).value = "";
      $("#events-kind").value = "";
      $("#events-since").value = "24h";
      apply();
    });
  });
  window.consolePages.events = { load, refreshMs: null };
})();
