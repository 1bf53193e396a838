// The Audit view: who did what and when (`GET /v1/audit`), newest first, filtered by actor,
// action and target. Each action changes a job, so the list reloads when the stream brings a
// job change (at most once a second); it never polls.
"use strict";

const JOB_ACTIONS = ["submit", "cancel", "retry", "replay"];

Console.views.audit = {
  init() {
    $("audit-filters").addEventListener("submit", ev => { ev.preventDefault(); this.load(); });
  },

  show() {
    this.load();
    Console.listeners.add(() => this.reloadSoon());
  },

  reloadSoon() {
    if (this.pending) return;
    this.pending = setTimeout(() => { this.pending = null; this.load(); }, 1000);
  },

  async load() {
    const params = new URLSearchParams();
    for (const [k, v] of new FormData($("audit-filters"))) if (v) params.set(k, v);
    try {
      this.render(await Console.api("GET", `/v1/audit?${params}`));
    } catch (e) {
      $("error").textContent = `reading the audit trail failed: ${e.message || e}`;
    }
  },

  render(records) {
    const target = r => (JOB_ACTIONS.includes(r.action)
      ? el("a", { href: `/jobs/${encodeURIComponent(r.target)}`, "data-internal": "" }, r.target) : r.target);
    const rows = records.map(r => el("tr", { "data-audit": r.id, "data-action": r.action },
      el("td", {}, when(r.at)), el("td", { class: "actor" }, r.actor), el("td", { class: "action" }, r.action),
      el("td", { class: "target" }, target(r)), el("td", {}, r.detail == null ? "–" : el("code", {}, JSON.stringify(r.detail)))));
    $("audit-table").tBodies[0].replaceChildren(...rows);
    $("audit-count").textContent = `${records.length} record${records.length === 1 ? "" : "s"}, newest first`;
  },
};
