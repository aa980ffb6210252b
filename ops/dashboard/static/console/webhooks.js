"use strict";
// Webhook subscriptions' health: delivered, failing, waiting, dead, the last error,
// and pause / resume (POST api/webhooks/{id}/pause|resume with the dashboard token).
// Figures the notify stage adds to GET api/webhooks (backlog drain: arrival and
// allowed rate, time to drain) are shown beside a subscription when present; the
// table never waits for them.
(() => {
  const { $, kit, askToken, forgetToken, message } = window.consoleLib;
  // the fields of api/webhooks's subscriptions that the health table already shows
  const KNOWN = new Set(["id", "url", "geofence_ids", "tracker_ids", "kinds", "active", "disabled_reason",
    "priority", "batch_max", "allow_private", "allow_http", "description", "created_at"]);
  let extra = {};  // subscription id -> [[name, value]] from api/webhooks
  let notes = [];  // top-level figures of api/webhooks beyond its lists

  function figure(v) {
    if (v === null || v === undefined) return "\u2014";
    if (typeof v === "number") return kit().num.format(Math.round(v * 10) / 10);
    if (typeof v === "object") return Object.entries(v).map(([k, x]) => k.replace(/_/g, " ") + " " + figure(x)).join(", ");
    return String(v);
  }

  function readExtras() {
    kit().getJson("api/webhooks").then((body) => {
      extra = {};
      for (const s of body.subscriptions || []) {
        const more = Object.entries(s).filter(([k]) => !KNOWN.has(k));
        if (more.length) extra[s.id] = more;
      }
      notes = Object.entries(body).filter(([k]) => !["subscriptions", "deliveries"].includes(k));
      for (const [id, more] of Object.entries(extra)) {
        const cell = document.querySelector("#hook-rows tr[data-sub='" + id + "'] [data-field='drain']");
        if (cell) cell.textContent = more.map(([k, v]) => k.replace(/_/g, " ") + ": " + figure(v)).join("; ");
      }
      $("#hooks-notes").textContent = notes.map(([k, v]) => k.replace(/_/g, " ") + ": " + figure(v)).join(" \u00b7 ");
    }).catch(() => {});  // the health table stands on its own
  }

  async function act(s, action, button) {
    const { api } = kit();
    const out = $("#hooks-message");
    button.disabled = true;
    try {
      for (;;) {
        const token = await askToken($("#hooks-token-form"));
        if (!token) { message(out, ""); return; }
        const res = await api("api/webhooks/" + s.id + "/" + action, { method: "POST", headers: { Authorization: "Bearer " + token } });
        const body = await res.json().catch(() => ({}));
        if (res.status === 401) { forgetToken(); message(out, "The token was not accepted; enter it again.", "error"); continue; }
        if (!res.ok) { message(out, body.error || res.statusText, "error"); return; }
        message(out, (action === "pause" ? "Paused" : "Resumed") + " subscription " + s.id + " (" + body.url + ")", "ok");
        await load();
        return;
      }
    } catch (err) {
      message(out, "Request failed: " + err.message, "error");
    } finally {
      button.disabled = false;
    }
  }

  async function load() {
    const { el, getJson, timeEl, num } = kit();
    let body;
    try {
      body = await getJson("api/webhooks/health");
      $("#hooks-error").hidden = true;
    } catch (err) {
      $("#hooks-error").hidden = false;
      $("#hooks-error").textContent = "Could not read the subscriptions: " + err.message;
      return;
    }
    readExtras();
    $("#hook-rows").replaceChildren(...body.subscriptions.map((s) => {
      const active = s.state === "active";
      const button = el("button", { class: "btn" + (active ? "" : " primary"), type: "button",
        "data-action": active ? "pause" : "resume", text: active ? "Pause" : "Resume" });
      button.addEventListener("click", () => act(s, active ? "pause" : "resume", button));
      const e = s.last_error;
      const more = extra[s.id];
      return el("tr", { "data-sub": String(s.id), "data-state": s.state },
        el("td", { class: "num", text: String(s.id) }),
        el("td", { class: "wrap", text: s.url + (s.description ? " \u00b7 " + s.description : "") }),
        el("td", {}, el("span", { class: "tag", "data-state": s.state, "data-field": "state", text: s.state,
          title: s.disabled_reason || "" })),
        el("td", { class: "num", "data-field": "delivered", text: num.format(s.delivered) }),
        el("td", { class: "num" + (s.failing ? " bad" : ""), "data-field": "failing", text: num.format(s.failing) }),
        el("td", { class: "num", "data-field": "waiting", text: num.format(s.waiting) }),
        el("td", { class: "num" + (s.dead ? " bad" : ""), "data-field": "dead", text: num.format(s.dead) }),
        el("td", { class: "id" }, timeEl(s.last_delivered_at)),
        el("td", { class: "error", "data-field": "last_error" }, e
          ? el("span", {}, timeEl(e.at), " " + (e.status === null ? "no response" : "HTTP " + e.status) + (e.error ? ": " + e.error : ""))
          : "\u2014"),
        el("td", { class: "wrap", "data-field": "drain",
          text: more ? more.map(([k, v]) => k.replace(/_/g, " ") + ": " + figure(v)).join("; ") : "" }),
        el("td", { class: "actions" }, button));
    }));
    const empty = $("#hooks-empty");
    empty.removeAttribute("data-loading");
    empty.textContent = "No webhook subscriptions (trackstream webhook add).";
    empty.hidden = body.subscriptions.length > 0;
    $("#hooks-table").hidden = body.subscriptions.length === 0;
  }
  window.consolePages.webhooks = { load, refreshMs: 10000 };
})();
