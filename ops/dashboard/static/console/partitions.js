"use strict";
// History partitions: rows and size of each partition of location_history and
// geofence_events (on SQLite, each table), and what retention drops next
// (GET api/partitions, as `trackstream history status`).
(() => {
  const { $, kit, bytes } = window.consoleLib;

  async function load() {
    const { el, getJson, num } = kit();
    let body;
    try {
      body = await getJson("api/partitions");
      $("#partitions-error").hidden = true;
    } catch (err) {
      $("#partitions-error").hidden = false;
      $("#partitions-error").textContent = "Could not read the partitions: " + err.message;
      return;
    }
    const next = new Set(body.next_drop.map((p) => p.partition));
    const totals = {};
    for (const p of body.partitions) {
      const t = totals[p.table] = totals[p.table] || { rows: 0, bytes: 0, parts: 0 };
      t.rows += p.rows; t.bytes += p.bytes || 0; t.parts += 1;
    }
    $("#partitions-totals").textContent = Object.entries(totals).map(([table, t]) =>
      table + ": " + num.format(t.rows) + " rows" + (body.dialect === "postgresql" ? ", " + bytes(t.bytes) + " in " + t.parts + " partition(s)" : "")).join(" \u00b7 ");
    let retention;
    if (body.retention_days === null) {
      retention = "No retention set (TRACKSTREAM_HISTORY_RETENTION_DAYS): everything is kept.";
    } else if (!body.next_drop.length) {
      retention = "Retention " + body.retention_days + " d: nothing to drop.";
    } else {
      const when = body.next_drop_at && body.next_drop_at <= body.now ? "at the next prune" : body.next_drop_at;
      retention = "Retention " + body.retention_days + " d drops next (" + when + "): " +
        body.next_drop.map((p) => p.partition + " (" + num.format(p.rows) + " rows)").join(", ") + ".";
    }
    $("#partitions-retention").textContent = retention;
    const stray = body.partitions.filter((p) => p.default && p.rows > 0);
    $("#partitions-default").textContent = stray.length
      ? stray.map((p) => num.format(p.rows) + " row(s) in " + p.partition).join(", ") +
        ": reports no month partition takes (far past or future), counted, never lost." : "";
    $("#partition-rows").replaceChildren(...body.partitions.map((p) => {
      const attrs = { "data-partition": p.partition, "data-table": p.table };
      if (next.has(p.partition)) attrs["data-next-drop"] = "1";
      const range = p.from ? p.from.slice(0, 10) + " \u2192 " + p.to.slice(0, 10) : (p.default ? "default" : "whole table");
      return el("tr", attrs,
        el("td", { text: p.table }), el("td", { class: "id", text: p.partition }), el("td", { class: "id", text: range }),
        el("td", { class: "num", "data-field": "rows", text: num.format(p.rows) }),
        el("td", { class: "num", text: bytes(p.bytes) }),
        el("td", { class: "id", text: p.oldest || "\u2014" }), el("td", { class: "id", text: p.newest || "\u2014" }),
        el("td", { text: next.has(p.partition) ? "dropped next" : "" }));
    }));
    $("#partitions-note").textContent = body.dialect === "postgresql"
      ? "Rows are the planner's estimate (exact for the default partition): `trackstream history status --exact` counts them."
      : "SQLite keeps each table whole: retention deletes old rows in small batches.";
  }
  window.consolePages.partitions = { load, refreshMs: 30000 };
})();
