"use strict";
// The colour theme: the system's (prefers-color-scheme) until the header's toggle
// picks one, which then sticks (localStorage). Loaded in <head>, so the first paint
// already has the right colours; console.css defines both themes with CSS variables.
(() => {
  const KEY = "trackstream.theme";
  const root = document.documentElement;
  const dark = window.matchMedia("(prefers-color-scheme: dark)");
  const stored = localStorage.getItem(KEY);
  if (stored === "dark" || stored === "light") root.dataset.theme = stored;
  const current = () => root.dataset.theme || (dark.matches ? "dark" : "light");

  function label(button) {
    const isDark = current() === "dark";
    button.textContent = isDark ? "\u2600 Light" : "\u263e Dark";
    button.title = "switch to the " + (isDark ? "light" : "dark") + " theme";
    button.setAttribute("aria-pressed", String(isDark));
    root.dataset.shownTheme = current();
  }
  document.addEventListener("DOMContentLoaded", () => {
    const button = document.getElementById("theme-toggle");
    if (!button) return;
    label(button);
    button.addEventListener("click", () => {
      const next = current() === "dark" ? "light" : "dark";
      root.dataset.theme = next;
      localStorage.setItem(KEY, next);
      label(button);
    });
    dark.addEventListener("change", () => label(button));
  });
})();
