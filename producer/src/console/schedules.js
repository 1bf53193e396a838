// The Schedules & triggers view: each schedule's next fire and its last fires, each trigger rule
// with its last matches (time and the job it submitted), from `GET /v1/schedules` and
// `GET /v1/triggers`. It reloads when the stream brings a job submitted by a schedule or an event
// (at most once a second) and when a next fire comes due; it never polls.
"use strict";

Console.views.schedules = {
  show() {
    this.load();
    Console.listeners.add(job => {
      const kind = job.trigger && job.trigger.kind;
      if (kind === "schedule" || kind === "event") this.reloadSoon();
    });
  },

  reloadSoon() {
    if (this.pending) return;
    this.pending = setTimeout(() => { this.pending = null; if (!$("view-schedules").hidden) this.load(); }, 1000);
  },

  async load() {
    try {
      const [schedules, triggers] = await Promise.all([Console.api("GET", "/v1/schedules"), Console.api("GET", "/v1/triggers")]);
      this.render(schedules, triggers);
    } catch (e) {
      $("error").textContent = `reading the schedules and triggers failed: ${e.message || e}`;
    }
  },

  render(schedules, triggers) {
    const at = (t, cls) => el("td", { class: cls, "data-at": t || "" }, when(t));
    const job = f => (f ? el("a", { href: `/jobs/${encodeURIComponent(f.job_id)}`, "data-internal": "" }, f.job_id) : "–");
    const recent = fs => (fs.length ? el("ul", { class: "fires" }, ...fs.map(f => el("li", {}, `${when(f.at)} `, job(f), f.status ? ` ${f.status}` : ""))) : "–");
    const srows = schedules.map(s => el("tr", { "data-schedule": s.name },
      el("td", {}, s.name), el("td", {}, el("code", {}, s.cron), ` ${s.timezone}`), el("td", {}, `${s.job_type} · ${s.bot}`),
      el("td", {}, s.missed), at(s.next_fire, "next-fire"), at(s.last_fire && s.last_fire.at, "last-fire"),
      el("td", { class: "last-job" }, job(s.last_fire)), el("td", {}, recent(s.fires))));
    const trows = triggers.map(r => el("tr", { "data-rule": r.name },
      el("td", {}, r.name), el("td", {}, el("code", {}, r.routing_key)), el("td", {}, `${r.job_type} · ${r.bot}`),
      el("td", { class: "num" }, `${r.debounce_s} s`), at(r.last_match && r.last_match.at, "last-match"),
      el("td", { class: "last-job" }, job(r.last_match)), el("td", {}, recent(r.matches))));
    const head = hs => el("thead", {}, el("tr", {}, ...hs.map(h => el("th", {}, h))));
    set("schedules",
      srows.length ? el("table", { id: "schedules-table" }, head(["schedule", "cron", "job", "missed fires", "next fire", "last fire", "last job", "recent fires"]), el("tbody", {}, ...srows))
        : el("p", { class: "muted" }, "No schedule is configured."));
    set("triggers",
      trows.length ? el("table", { id: "triggers-table" }, head(["rule", "routing key", "job", "debounce", "last match", "last job", "recent matches"]), el("tbody", {}, ...trows))
        : el("p", { class: "muted" }, "No trigger rule is configured."));
    // Load again once the soonest next fire is due (its job then shows up).
    const next = schedules.map(s => Date.parse(s.next_fire)).filter(t => t > Date.now());
    clearTimeout(this.due);
    if (next.length) this.due = setTimeout(() => { if (!$("view-schedules").hidden) this.load(); }, Math.min(Math.min(...next) - Date.now() + 1500, 3600000));
  },
};
