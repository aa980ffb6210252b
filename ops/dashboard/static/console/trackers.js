"use strict";
// The trackers page: the fleet's freshness, and one page of the trackers at a time,
// found by part of an id or a name (GET api/trackers?q=&state=&sort=&offset=&limit=).
(() => {
  const { $, kit } = window.consoleLib;
  const PAGE = 100;
  let offset = 0;
  let matched = 0;  // trackers the last answer matched
  let timer = null;
  let asked = 0;  // the newest request: an older answer arriving late is dropped

  // the location API's trouble with one tracker: its error, late and rejected reports
  function sourceText(s) {
    if (!s) return "";
    const parts = [];
    if (s.error) parts.push(s.error + " \u00d7" + s.error_count + (s.retry_at ? ", retry " + s.retry_at.slice(11, 16) : ""));
    if (s.late_reports) parts.push("late " + s.late_reports + (s.beyond_bound_reports ? " (" + s.beyond_bound_reports + " beyond bound)" : ""));
    if (s.rejected_reports) parts.push("rejected " + s.rejected_reports);
    return parts.join("; ");
  }

  function params(fresh) {
    const p = new URLSearchParams({ offset: String(offset), limit: String(PAGE) });
    if (fresh) p.set("fresh", "1");
    const state = $("#trackers-state").value, q = $("#trackers-q").value.trim(), sort = $("#trackers-sort").value;
    if (state) p.set("state", state);
    if (q) p.set("q", q);
    if (sort !== "stale") p.set("sort", sort);
    return p;
  }

  async function load(fresh) {
    const { el, getJson, timeEl, age, num } = kit();
    const mine = ++asked;
    let body;
    try {
      body = await getJson("api/trackers?" + params(fresh === true));
      if (mine !== asked) return;
      $("#trackers-error").hidden = true;
    } catch (err) {
      $("#trackers-error").hidden = false;
      $("#trackers-error").textContent = "Could not load trackers: " + err.message;
      return;
    }
    if (body.matched && offset >= body.matched) { offset = Math.max(0, body.matched - PAGE); return load(); }
    const sm = body.summary;
    const states = Object.entries(sm.states).filter(([, n]) => n).map(([s, n]) => n + " " + s).join(", ");
    $("#trackers-summary").textContent = sm.total + " trackers (" + (states || "none") + "); " +
      sm.within_guarantee + " of " + sm.in_run + " in run fetched within " + sm.guarantee;
    const src = body.source, errs = Object.entries(src.trackers_in_error).map(([c, n]) => n + " " + c).join(", ");
    $("#trackers-source").textContent = (src.late_reports || src.rejected_reports || errs)
      ? "source: " + src.late_reports + " late report(s) stored, " + src.beyond_bound_reports +
        " later than the " + src.lateness_s + " s bound; " + src.rejected_reports +
        " record(s) rejected; trackers in error: " + (errs || "none") : "";
    const top = Math.max(1, ...sm.buckets.map((b) => b.count));
    $("#trackers-hist").replaceChildren(...sm.buckets.map((b) => el("div", { class: "col", "data-bucket": b.label },
      el("span", { class: "n", text: String(b.count) }),
      el("div", { class: "barv", style: "height:" + (100 * b.count / top).toFixed(0) + "%" }))));
    $("#trackers-hist-labels").replaceChildren(...sm.buckets.map((b) => el("span", { text: b.label })));
    const q = $("#trackers-q").value.trim();
    const first = body.shown ? body.offset + 1 : 0;
    $("#trackers-count").textContent = body.shown
      ? num.format(first) + "\u2013" + num.format(body.offset + body.shown) + " of " + num.format(body.matched) +
        (q ? " matching \u201c" + q + "\u201d" : "")
      : (q ? "no tracker matches \u201c" + q + "\u201d" : "no trackers");
    $("#trackers-count").title = "as of " + body.as_of;
    matched = body.matched;
    $("#trackers-prev").disabled = $("#trackers-first").disabled = body.offset === 0;
    $("#trackers-next").disabled = $("#trackers-last").disabled = body.offset + body.shown >= body.matched;
    $("#tracker-rows").replaceChildren(...body.trackers.map((t) => {
      const tr = el("tr", { class: "clickable", "data-tracker": t.tracker_id, title: "trace " + t.tracker_id },
        el("td", { class: "id", text: t.tracker_id }),
        el("td", { text: t.name }),
        el("td", {}, el("span", { class: "st", "data-state": t.state, text: t.state })),
        el("td", { class: "num", text: age(t.age_s) }),
        el("td", { class: "id" }, timeEl(t.last_fix_at)),
        el("td", { class: "id" }, timeEl(t.last_fetch_at)),
        el("td", { class: "id", text: t.lat === null ? "\u2014" : t.lat.toFixed(4) + ", " + t.lon.toFixed(4) }),
        el("td", { text: t.city || "" }),
        el("td", { class: "source", text: sourceText(t.source) }));
      tr.addEventListener("click", () => { location.hash = "#trace/" + encodeURIComponent(t.tracker_id); });
      return tr;
    }));
  }

  function again() { offset = 0; load(); }
  document.addEventListener("DOMContentLoaded", () => {
    $("#trackers-state").addEventListener("change", again);
    $("#trackers-sort").addEventListener("change", again);
    $("#trackers-refresh").addEventListener("click", () => load(true));
    $("#trackers-q").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(again, 300); });
    $("#trackers-q").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { clearTimeout(timer); again(); } });
    $("#trackers-prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
    $("#trackers-next").addEventListener("click", () => { offset += PAGE; load(); });
    $("#trackers-first").addEventListener("click", () => { offset = 0; load(); });
    $("#trackers-last").addEventListener("click", () => { offset = Math.max(0, Math.ceil(matched / PAGE) - 1) * PAGE; load(); });
  });
  window.consolePages.trackers = { load, refreshMs: 10000 };
})();
