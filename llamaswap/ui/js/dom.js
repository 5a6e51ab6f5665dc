// Tiny DOM helpers: build elements without innerHTML (no injection risk).

/**
 * h("div.card#x", {onclick, title}, child, "text", [children])
 * Attributes starting with "on" become listeners; `class`, `dataset`,
 * `style` objects and boolean attributes are handled; null/false children
 * are skipped.
 */
export function h(tag, attrs, ...children) {
  const [name, ...rest] = tag.split(/(?=[.#])/);
  const el = document.createElement(name || "div");
  for (const part of rest) {
    if (part[0] === ".") el.classList.add(part.slice(1));
    else if (part[0] === "#") el.id = part.slice(1);
  }
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "class") {
      for (const c of String(value).split(/\s+/)) if (c) el.classList.add(c);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "style" && typeof value === "object") {
      Object.assign(el.style, value);
    } else if (key === "value" || key === "checked" || key === "selected" || key === "disabled" || key === "hidden") {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Replace the content of `el` with `children`. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function fmtNumber(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

/** A speed figure: llama-swap uses -1 for "unknown". */
export function fmtSpeed(n) {
  if (n === null || n === undefined || n < 0) return "–";
  return fmtNumber(n, n < 10 ? 2 : n < 1000 ? 1 : 0);
}

/** Token counts: -1 means "unknown". */
export function fmtTokens(n) {
  if (n === null || n === undefined || n < 0) return "–";
  return fmtNumber(n);
}

export function fmtDuration(ms) {
  if (ms === null || ms === undefined || ms < 0) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60000);
  return `${m}m ${Math.round((ms % 60000) / 1000)}s`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export function fmtTime(ts) {
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return String(ts ?? "");
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  return sameDay ? d.toLocaleTimeString() : d.toLocaleString();
}

/** A note shown in place of a feature the server does not offer. */
export function unavailable(what, detail) {
  return h("p.note", { role: "status", dataset: { unavailable: "" } },
    h("strong", `${what} is not available`), " on this llamaswap server",
    detail ? ` (${detail})` : "", ".");
}

/** Run `fn` at most once per `ms`, trailing call guaranteed. */
export function throttle(fn, ms) {
  let timer = null;
  let pending = false;
  const run = () => {
    timer = null;
    if (pending) {
      pending = false;
      fn();
      timer = setTimeout(run, ms);
    }
  };
  return () => {
    pending = true;
    if (timer === null) run();
  };
}
