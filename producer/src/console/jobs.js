// The Jobs view: filters, the live list, and submitting a job.
"use strict";

// An RFC 3339 time as milliseconds, for ordering (the API's times differ in their digits).
const time = t => (t ? Date.parse(t) : 0);

Console.views.jobs = {
  rows: new Map(),

  init() {
    $("job-filters").addEventListener("submit", ev => { ev.preventDefault(); this.load(); });
    $("submit-form").addEventListener("submit", ev => { ev.preventDefault(); this.submit(new FormData(ev.target)); });
    $("jobs-older").addEventListener("click", () => this.load(this.next));
  },

  show() {
    this.load();
    Console.listeners.add(job => this.update(job));
  },

  filters() {
    const f = Object.fromEntries(new FormData($("job-filters")));
    if (f.since) f.since = new Date(f.since).toISOString();
    return f;
  },

  // Does a job pass the filters the API cannot apply (trigger, id prefix) and those it did?
  matches(job, f) {
    return (!f.status || job.status === f.status) && (!f.type || job.job_type === f.type) && (!f.bot || job.bot === f.bot)
      && (!f.trigger || (job.trigger && job.trigger.kind === f.trigger)) && (!f.q || job.job_id.startsWith(f.q))
      && (!f.since || job.created_at >= f.since);
  },

  // The first page of the filtered list (the API filters and pages it: keyset on creation time),
  // or with `before` (the previous page's X-Next-Cursor) the next, older page below it.
  async load(before) {
    const f = this.filters();
    if (!before && f.q && f.q.length >= 32) {
      // A whole job id: open it.
      Console.go(`/jobs/${encodeURIComponent(f.q)}`);
      return;
    }
    const params = new URLSearchParams();
    for (const k of ["status", "type", "bot", "trigger", "since", "q", "limit"]) if (f[k]) params.set(k, f[k]);
    if (before) params.set("before", before);
    // Changes the stream brings while the first page loads are kept and shown over it: the
    // page may have been read before them, and drawing it used to put their jobs back.
    const arrived = before ? null : [];
    if (arrived) this.arrived = arrived;
    try {
      const { data: jobs, headers } = await Console.call("GET", `/v1/jobs?${params}`);
      if (arrived && this.arrived !== arrived) return; // a later load replaced this one
      this.next = headers.get("x-next-cursor");
      if (arrived) {
        this.arrived = null;
        this.rows.clear();
        $("jobs-table").tBodies[0].replaceChildren();
        for (const j of jobs) this.update(j, true);
        for (const j of arrived) this.update(j);
      } else {
        for (const j of jobs) this.update(j, true);
      }
      $("jobs-older").hidden = !this.next;
      this.count();
    } catch (e) {
      if (arrived && this.arrived === arrived) {
        this.arrived = null;
        for (const j of arrived) this.update(j);
      }
      $("error").textContent = `listing jobs failed: ${e.message || e}`;
    }
  },

  // Shows a job: updates its row in place (unless the row is newer), or, when it matches the
  // filters, adds it where its creation time puts it: `listed` rows come in the API's order and
  // go below; a job older than the page's last row is left to the next page.
  update(job, listed) {
    if (this.arrived) { this.arrived.push(job); return; }
    const old = this.rows.get(job.job_id);
    if (old && time(old.dataset.updated) > time(job.updated_at)) return;
    const tr = el("tr", { "data-job-id": job.job_id, "data-status": job.status, "data-created": job.created_at, "data-updated": job.updated_at || "" },
      el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(job.job_id)}`, "data-internal": "" }, el("code", {}, job.job_id))),
      el("td", {}, job.job_type), el("td", {}, job.bot), el("td", {}, el("span", { class: `badge ${job.status}` }, job.status)),
      el("td", { class: "num" }, job.attempts), el("td", {}, job.trigger ? `${job.trigger.kind}: ${job.trigger.source}` : "–"),
      el("td", {}, when(job.created_at)), el("td", {}, when(job.updated_at)));
    const body = $("jobs-table").tBodies[0];
    if (old) old.replaceWith(tr);
    else if (listed) body.append(tr);
    else if (this.matches(job, this.filters())) {
      const below = [...body.rows].find(r => time(r.dataset.created) < time(job.created_at));
      if (below) below.before(tr);
      else if (!this.next) body.append(tr);
      else return;
    } else return;
    this.rows.set(job.job_id, tr);
    this.count();
  },

  count() {
    $("jobs-summary").textContent = `${this.rows.size} jobs, newest first` + (this.next ? " (older ones on the next page)" : "");
  },

  async submit(form) {
    let params;
    try { params = JSON.parse(form.get("params") || "{}"); } catch (e) {
      $("error").textContent = `params must be JSON: ${e.message}`;
      return;
    }
    const body = { job_type: form.get("job_type").trim(), bot: form.get("bot").trim(), params };
    // One job per click: the button waits for the answer (a double click used to submit twice).
    const button = $("submit-job");
    if (button.disabled) return;
    button.disabled = true;
    const out = await Console.act(`submitted ${body.job_type} for ${body.bot}:`, () => Console.api("POST", "/v1/jobs", body))
      .finally(() => { button.disabled = false; });
    if (out) $("message").append(" ", el("a", { href: `/jobs/${out.job_id}`, "data-internal": "", id: "submitted-job" }, out.job_id));
  },
};
