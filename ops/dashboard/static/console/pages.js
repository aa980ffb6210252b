"use strict";
// What the console's pages (static/console/*.js) share. Each page registers itself in
// window.consolePages as { load(arg), refreshMs }; index.html's router shows the page's
// section (#view-<name>) and calls load() (again every refreshMs, if set). The page's
// own helpers (el, timeEl, api, getJson, age, num) come from index.html as
// window.consoleKit, which exists by the time load() first runs.
window.consolePages = window.consolePages || {};
window.consoleLib = (() => {
  const TOKEN_KEY = "trackstream.dashboardToken";  // the mutation token, as the DLQ panel keeps it
  const $ = (sel, root = document) => root.querySelector(sel);
  const kit = () => window.consoleKit;

  // a pager over cursors: pages[i] is the cursor that gives page i (null: the first)
  function cursorPager(root, go) {
    const prev = kit().el("button", { class: "btn", type: "button", "data-page": "prev", text: "\u2190 Newer" });
    const next = kit().el("button", { class: "btn", type: "button", "data-page": "next", text: "Older \u2192" });
    const where = kit().el("span", { class: "where", "data-field": "page" });
    root.replaceChildren(prev, where, next);
    const state = { pages: [null], index: 0, next: null };
    prev.addEventListener("click", () => { if (state.index > 0) { state.index -= 1; go(state.pages[state.index]); } });
    next.addEventListener("click", () => {
      if (!state.next) return;
      state.pages = state.pages.slice(0, state.index + 1).concat([state.next]);
      state.index += 1;
      go(state.next);
    });
    return {
      reset() { state.pages = [null]; state.index = 0; state.next = null; },
      cursor() { return state.pages[state.index]; },
      show(nextCursor, text) {
        state.next = nextCursor || null;
        prev.disabled = state.index === 0;
        next.disabled = !state.next;
        where.textContent = "page " + (state.index + 1) + (text ? " \u00b7 " + text : "");
      },
      labels(newer, older) { prev.textContent = newer; next.textContent = older; },
    };
  }

  // the mutation token (TRACKSTREAM_DASHBOARD_TOKEN): stored, or asked for in `form`
  // (an .ask-form with an input, a submit and a cancel button); null when cancelled
  function askToken(form) {
    const stored = sessionStorage.getItem(TOKEN_KEY);
    if (stored) return Promise.resolve(stored);
    form.hidden = false;
    const input = $("input", form);
    input.value = "";
    input.focus();
    return new Promise((resolve) => {
      const done = (value) => {
        form.hidden = true;
        form.removeEventListener("submit", onSubmit);
        $("[data-cancel]", form).removeEventListener("click", onCancel);
        resolve(value);
      };
      const onSubmit = (ev) => {
        ev.preventDefault();
        const v = input.value.trim();
        if (!v) return;
        sessionStorage.setItem(TOKEN_KEY, v);
        done(v);
      };
      const onCancel = () => done(null);
      form.addEventListener("submit", onSubmit);
      $("[data-cancel]", form).addEventListener("click", onCancel);
    });
  }
  function forgetToken() { sessionStorage.removeItem(TOKEN_KEY); }

  function message(node, text, kind = "") {
    node.textContent = text;
    node.className = "message " + kind;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "\u2014";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  // on a narrow screen the navigation scrolls sideways: keep the current view's tab in sight
  function showCurrentTab() {
    const tab = document.querySelector('nav#views a[aria-current="page"]');
    if (tab) tab.scrollIntoView({ block: "nearest", inline: "nearest" });
  }
  window.addEventListener("hashchange", () => setTimeout(showCurrentTab));
  document.addEventListener("DOMContentLoaded", () => setTimeout(showCurrentTab));

  return { $, kit, cursorPager, askToken, forgetToken, message, bytes };
})();
