// Entry point: routing between pages, the connection indicator, version.

import { ensureAuth, getJSON } from "./api.js";
import { h, replace } from "./dom.js";
import { store } from "./store.js";

const BASE = "/ui/";
const PAGES = {
  models: () => import("./pages/models.js"),
  activity: () => import("./pages/activity.js"),
  logs: () => import("./pages/logs.js"),
  playground: () => import("./pages/playground.js"),
  inflight: () => import("./pages/inflight.js"),
};
const TITLES = { models: "Models", activity: "Activity", logs: "Logs", playground: "Playground", inflight: "In flight" };

let unmount = null;
let renderSeq = 0;

function pageFromLocation() {
  let path = location.pathname;
  if (path.startsWith(BASE)) path = path.slice(BASE.length);
  else if (path === "/ui") path = "";
  // Hash routes (#/logs) work too, for links from older UIs.
  const hash = location.hash.replace(/^#\/?/, "");
  const name = (path.split("/")[0] || hash.split(/[/?]/)[0] || "models").toLowerCase();
  return PAGES[name] ? name : null;
}

export function navigate(url, { replace: replaceState = false } = {}) {
  if (replaceState) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  render();
}

async function render() {
  const seq = ++renderSeq;
  const name = pageFromLocation();
  const main = document.getElementById("page");
  for (const a of document.querySelectorAll(".tabs a")) {
    if (a.dataset.page === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (unmount) {
    try { unmount(); } catch (err) { console.warn("unmount failed", err); }
    unmount = null;
  }
  if (!name) {
    replace(main, h("div.page-head", h("h1", "Not found")),
      h("p.note", "There is no such page. ", h("a", { href: `${BASE}models`, "data-route": "" }, "Go to Models"), "."));
    document.title = "llamaswap";
    return;
  }
  document.title = `${TITLES[name]} · llamaswap`;
  const mod = await PAGES[name]();
  if (seq !== renderSeq) return;
  replace(main);
  main.dataset.page = name;
  unmount = mod.mount(main, { navigate, params: new URLSearchParams(location.search) }) || null;
}

function updateConn(mode) {
  const el = document.getElementById("conn");
  const labels = {
    live: ["live", "Receiving live events from /api/events"],
    polling: ["polling", "No event stream: refreshing /running every 2 s"],
    offline: ["offline", "Cannot reach llamaswap; retrying"],
    connecting: ["connecting", "Connecting"],
  };
  const [text, title] = labels[mode] || labels.connecting;
  el.className = `conn ${mode}`;
  el.textContent = text;
  el.title = title;
}

function updateInflightCount() {
  const el = document.getElementById("inflight-count");
  const n = store.inflight.size;
  el.hidden = !store.inflightLive || n === 0;
  el.textContent = String(n);
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-route]");
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  e.preventDefault();
  if (a.getAttribute("href") !== location.pathname + location.search) navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", render);

store.on("mode", updateConn);
store.on("inflight", updateInflightCount);
updateConn(store.mode);

ensureAuth().then(() => {
  store.start();
  render();
  getJSON("/api/version")
    .then((v) => {
      document.getElementById("version").textContent = `llamaswap ${v.version || ""}`.trim();
    })
    .catch(() => { /* optional */ });
});
