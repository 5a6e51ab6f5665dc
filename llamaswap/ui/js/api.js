// HTTP access to llamaswap: API key handling and error classification.

const KEY_STORAGE = "llamaswap.apiKey";

/** The endpoint answered 404/405/501: this server does not offer it. */
export class NotAvailable extends Error {
  constructor(path, status) {
    super(`${path} is not available (HTTP ${status})`);
    this.name = "NotAvailable";
    this.path = path;
    this.status = status;
  }
}

/** Any other non-2xx answer; `message` is the server's error text. */
export class HttpError extends Error {
  constructor(path, status, message) {
    super(message || `HTTP ${status}`);
    this.name = "HttpError";
    this.path = path;
    this.status = status;
  }
}

export function getKey() {
  try { return sessionStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key lives for this page only */ }
  memoryKey = key || "";
}

let memoryKey = "";
let loginPrompt = null; // a Promise while the login dialog is open

function currentKey() {
  return getKey() || memoryKey;
}

export function authHeaders(extra = {}) {
  const key = currentKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

/**
 * fetch() with the API key.  `credentials: "omit"` matters: llamaswap's 401
 * carries `WWW-Authenticate: Basic`, and a credentialed fetch would make
 * the browser show its own password prompt instead of handing us the 401.
 */
export function apiFetch(path, init = {}) {
  return fetch(path, { credentials: "omit", ...init, headers: authHeaders(init.headers || {}) });
}

/** Show the login dialog (once, however many requests are waiting). */
export function requestLogin(rejected = false) {
  if (loginPrompt) return loginPrompt;
  const dialog = document.getElementById("login");
  const form = document.getElementById("login-form");
  const input = document.getElementById("login-key");
  const error = document.getElementById("login-error");
  loginPrompt = new Promise((resolve) => {
    error.hidden = !rejected;
    error.textContent = rejected ? "That key was not accepted. Try again." : "";
    const onCancel = (e) => e.preventDefault(); // the app is useless without a key
    // Chromium lets a second Escape close a modal anyway: open it again.
    const onClose = () => { if (loginPrompt) setTimeout(() => { if (loginPrompt && !dialog.open) dialog.showModal(); }, 0); };
    const onSubmit = async (e) => {
      e.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      const res = await fetch("/v1/models", { credentials: "omit", headers: { Authorization: `Bearer ${key}` } }).catch(() => null);
      if (res && res.status === 401) {
        error.hidden = false;
        error.textContent = "That key was not accepted. Try again.";
        input.select();
        return;
      }
      setKey(key);
      form.removeEventListener("submit", onSubmit);
      dialog.removeEventListener("cancel", onCancel);
      dialog.removeEventListener("close", onClose);
      loginPrompt = null;
      dialog.close();
      input.value = "";
      resolve(key);
    };
    form.addEventListener("submit", onSubmit);
    dialog.addEventListener("cancel", onCancel);
    dialog.addEventListener("close", onClose);
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
  return loginPrompt;
}

/** Before anything else: make sure we hold a working key if one is needed. */
export async function ensureAuth() {
  const res = await apiFetch("/v1/models", { method: "HEAD" }).catch(() => null);
  if (res && res.status === 401) await requestLogin(Boolean(currentKey()));
}

async function errorText(res) {
  const text = await res.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    const msg = body?.error?.message ?? body?.error ?? body?.message ?? body?.detail;
    if (typeof msg === "string" && msg) return msg;
  } catch { /* not JSON */ }
  return text.trim() || `${res.status} ${res.statusText}`;
}

/**
 * fetch() with the API key; a 401 opens the login dialog and retries.
 * Resolves to the Response for 2xx; throws NotAvailable for 404/405/501
 * and HttpError otherwise.  `opts.raw` returns any Response unchecked.
 */
export async function request(path, opts = {}) {
  const { raw, ...init } = opts;
  for (let attempt = 0; ; attempt++) {
    const res = await apiFetch(path, init);
    if (res.status === 401 && attempt < 5) {
      await requestLogin(attempt > 0 || Boolean(currentKey()));
      continue;
    }
    if (raw || res.ok) return res;
    if (res.status === 404 || res.status === 405 || res.status === 501) {
      // A 404 with a JSON/text error from a real route ("model not found")
      // is an HttpError; a bare "404 page not found" means no such route.
      const text = await errorText(res);
      if (res.status !== 404 || /^404 page not found|^404 Not Found/i.test(text)) {
        throw new NotAvailable(path, res.status);
      }
      throw new HttpError(path, res.status, text);
    }
    throw new HttpError(path, res.status, await errorText(res));
  }
}

export async function getJSON(path, opts = {}) {
  const res = await request(path, opts);
  return res.json();
}

export async function postJSON(path, body, opts = {}) {
  const init = { method: "POST", ...opts };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = { "Content-Type": "application/json", ...(opts.headers || {}) };
  }
  const res = await request(path, init);
  const text = await res.text();
  try { return JSON.parse(text); } catch { return text; }
}

/** Which optional endpoints answered 404, so pages stop asking. */
const missing = new Map();

export function markMissing(path) { missing.set(path, Date.now()); }
export function isMissing(path, retryAfterMs = 60000) {
  const at = missing.get(path);
  if (at === undefined) return false;
  if (Date.now() - at > retryAfterMs) { missing.delete(path); return false; }
  return true;
}
