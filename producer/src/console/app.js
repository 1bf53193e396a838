// The console's core: sign-in, the API client, the live stream and the views' routing.
"use strict";

const SCOPES = ["read", "submit", "admin"];
const TERMINAL = ["succeeded", "failed", "dead", "cancelled", "superseded"];

const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) if (v != null) e.setAttribute(k, v);
  for (const k of kids) if (k != null && k !== "") e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
};
const fmt = (v, d = 4) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(d)) : v == null ? "–" : String(v));
const $ = id => document.getElementById(id);
const set = (id, ...nodes) => $(id).replaceChildren(...nodes.filter(n => n != null && n !== ""));
const when = t => (t ? new Date(t).toLocaleString() : "–");

function table(headers, rows, attrs = {}) {
  return el("table", attrs, el("tr", {}, ...headers.map(h => el("th", {}, h))),
    ...rows.map(r => el("tr", {}, ...r.map(c => (c instanceof Node ? el("td", {}, c) : el("td", typeof c === "number" ? { class: "num" } : {}, fmt(c)))))));
}

const Console = {
  token: null,
  who: null,
  views: {},
  listeners: new Set(),
  queueListeners: [],
  workerListeners: [],
  // Called when the view is left (a view's own stream is closed).
  leaving: [],
  source: null,
  // Sign-ins and sign-outs started: a sign-in's answer, or a retry of one, is taken only
  // while none came after it.
  signIns: 0,

  // Does the signed-in token's scope include `needed`?
  can(needed) {
    return !!this.who && SCOPES.indexOf(this.who.scope) >= SCOPES.indexOf(needed);
  },

  // Calls the API with the token; the answer's JSON (or text), or an Error with the API's message.
  async api(method, path, body) {
    return (await this.call(method, path, body)).data;
  },

  // Like `api`, with the response's headers: { data, headers }.
  async call(method, path, body) {
    const headers = { Authorization: `Bearer ${this.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    if (r.status === 401) {
      this.signOut("the token was refused; sign in again");
      throw new Error("not signed in");
    }
    const text = await r.text();
    let data = text;
    try { data = JSON.parse(text); } catch (_) { /* plain text (logs) */ }
    if (!r.ok) throw new Error(`${r.status}: ${(data && data.error) || r.statusText}`);
    return { data, headers: r.headers };
  },

  // Asks for a confirmation in the page's dialog; resolves to true when confirmed.
  confirm(text) {
    const d = $("confirm");
    $("confirm-text").textContent = text;
    return new Promise(resolve => {
      d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
      d.returnValue = "";
      d.showModal();
    });
  },

  // Runs an action, reports its outcome.
  async act(what, fn) {
    set("error"); set("message");
    try {
      const out = await fn();
      $("message").textContent = what;
      return out;
    } catch (e) {
      $("error").textContent = `${what} failed: ${e.message || e}`;
      return undefined;
    }
  },

  // Signs in with a token; an Error with `transient` set when the control plane could not
  // answer (unreachable, 5xx, 429): the token may still be good.
  async signIn(token) {
    // Only the latest sign-in counts: one a sign-out or another sign-in came after is dropped
    // (answered late, it signed a stale token back in).
    const seq = ++this.signIns;
    const stale = () => Object.assign(new Error("a later sign-in or sign-out came first"), { stale: true });
    let r;
    try {
      r = await fetch("/v1/session", { method: "POST", headers: { Authorization: `Bearer ${token}` } });
    } catch (e) {
      if (seq !== this.signIns) throw stale();
      throw Object.assign(new Error(`the control plane cannot be reached: ${e.message || e}`), { transient: true });
    }
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      if (seq !== this.signIns) throw stale();
      throw Object.assign(new Error(body.error || `sign-in refused (${r.status})`), { transient: r.status >= 500 || r.status === 429 });
    }
    const who = await r.json();
    if (seq !== this.signIns) throw stale();
    this.token = token;
    this.who = who;
    sessionStorage.setItem("trainyard-token", token);
    $("who").textContent = `${this.who.name} (${this.who.scope})`;
    $("sign-in").hidden = true;
    $("nav").hidden = false;
    $("sign-out").hidden = false;
    for (const e of document.querySelectorAll("[data-scope]")) e.hidden = !this.can(e.dataset.scope);
    this.openStream();
  },

  // Signs in again with a token kept from before (a reload, an ended stream): a refused token
  // signs out; a control plane that cannot answer now (a restart, a rollout) is asked again
  // every 2 s, keeping the token and the view, until it answers or another token is signed in.
  resume(token) {
    this.signIn(token).then(() => {
      if ($("error").textContent.endsWith("; trying again")) $("error").textContent = "";
    }, e => {
      if (e.stale) return;
      if (!e.transient) { this.signOut(String(e.message || e)); return; }
      this.live(false);
      $("error").textContent = `${e.message || e}; trying again`;
      const seq = this.signIns;
      setTimeout(() => { if (this.signIns === seq) this.resume(token); }, 2000);
    });
  },

  signOut(reason) {
    this.signIns++;
    sessionStorage.removeItem("trainyard-token");
    this.token = null; this.who = null;
    if (this.source) this.source.close();
    this.source = null;
    this.leave();
    fetch("/v1/session", { method: "DELETE" }).catch(() => {});
    for (const v of document.querySelectorAll(".view")) v.hidden = true;
    $("nav").hidden = true; $("sign-out").hidden = true; $("who").textContent = "";
    $("sign-in").hidden = false;
    $("sign-in-error").textContent = reason || "";
    this.live(false);
  },

  live(on) {
    $("live").textContent = on ? "● live" : "○ reconnecting";
    $("live").className = on ? "on" : "";
  },

  // The live stream: `job` events go to the listeners; `hello` (a fresh stream) reloads the view.
  openStream() {
    if (this.source) this.source.close();
    const s = new EventSource("/v1/stream");
    this.source = s;
    // The view loads on `hello` (then no change falls between its load and the stream); if the
    // stream cannot open, it loads anyway after 3 s, without live updates.
    let loaded = false;
    setTimeout(() => { if (!loaded && this.source === s) { loaded = true; this.route(); } }, 3000);
    s.addEventListener("hello", () => { loaded = true; this.live(true); this.route(); });
    s.addEventListener("resume", () => this.live(true));
    s.addEventListener("queues", ev => {
      const q = JSON.parse(ev.data);
      for (const f of this.queueListeners) f(q);
    });
    s.addEventListener("workers", ev => {
      const w = JSON.parse(ev.data);
      for (const f of this.workerListeners) f(w);
    });
    s.addEventListener("job", ev => {
      const job = JSON.parse(ev.data);
      for (const f of this.listeners) f(job);
    });
    s.onerror = () => {
      this.live(false);
      // A refused stream (expired session) is not retried by the browser: sign the session in again.
      if (s.readyState === EventSource.CLOSED && this.token) {
        setTimeout(() => this.resume(this.token), 1000);
      }
    };
  },

  // Shows the view of the address: /jobs/<id>, #dead-letters, #models, else the jobs list.
  route() {
    if (!this.who) return;
    const path = location.pathname.split("/").filter(Boolean);
    const name = path[0] === "jobs" && path[1] ? "job" : location.hash.slice(1) || "jobs";
    const view = this.views[name] ? name : "jobs";
    for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${view}`;
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === view);
    this.leave();
    this.listeners.clear();
    this.queueListeners = [];
    this.workerListeners = [];
    set("error"); set("message");
    this.views[view].show(decodeURIComponent(path[1] || ""));
  },

  leave() {
    for (const f of this.leaving) f();
    this.leaving = [];
  },

  go(url) {
    history.pushState(null, "", url);
    this.route();
  },

  start() {
    // A failure in the page itself is shown, not lost in the browser's console.
    window.addEventListener("error", e => { $("error").textContent = `console error: ${e.message}`; });
    window.addEventListener("unhandledrejection", e => { $("error").textContent = `console error: ${(e.reason && e.reason.message) || e.reason}`; });
    // A token in the fragment signs in and leaves the address bar at once.
    const m = location.hash.match(/token=([^&]+)/);
    if (m) history.replaceState(null, "", location.pathname);
    const token = m ? decodeURIComponent(m[1]) : sessionStorage.getItem("trainyard-token");
    $("sign-in").addEventListener("submit", ev => {
      ev.preventDefault();
      this.signIn($("token-input").value.trim()).then(() => { $("token-input").value = ""; })
        .catch(e => { if (!e.stale) $("sign-in-error").textContent = String(e.message || e); });
    });
    $("sign-out").addEventListener("click", () => this.signOut("signed out"));
    window.addEventListener("popstate", () => this.route());
    window.addEventListener("hashchange", () => this.route());
    document.addEventListener("click", ev => {
      const a = ev.target.closest("a[data-internal]");
      if (a && !ev.ctrlKey && !ev.metaKey) { ev.preventDefault(); this.go(a.getAttribute("href")); }
    });
    for (const v of Object.values(this.views)) if (v.init) v.init();
    if (token) this.resume(token);
    else this.signOut("");
  },
};
