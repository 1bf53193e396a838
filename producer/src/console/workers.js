// The Workers view: every worker heard from, from the heartbeats the workers publish (pushed by
// the live stream every 2 s): host, pod, node, GPU, device, slots in use, current jobs, version,
// last seen; a worker silent for three of its intervals (or that said goodbye) shows as gone.
"use strict";

Console.views.workers = {
  show() {
    Console.api("GET", "/v1/workers").then(w => this.render(w)).catch(e => { $("error").textContent = `reading the workers failed: ${e.message || e}`; });
    Console.workerListeners = [w => this.render(w)];
  },

  render(workers) {
    const jobs = ids => (ids.length ? el("span", {}, ...ids.flatMap((id, i) => [i ? " " : "", el("a", { href: `/jobs/${encodeURIComponent(id)}`, "data-internal": "" }, id)])) : "–");
    const rows = workers.map(w => {
      const a = (w.worker && w.worker.attributes) || {};
      const tr = el("tr", { "data-worker": w.worker.id, "data-state": w.state, class: w.state },
        ...[w.worker.id, w.state, w.host, w.pod || "–", a.node || "–", a.gpu || "–", w.device, w.job_types.join(", "),
          `${w.slots_in_use} / ${w.slots}`].map(c => el("td", {}, c)),
        el("td", { class: "current-jobs" }, jobs(w.current_jobs)),
        el("td", {}, w.version), el("td", {}, when(w.last_seen)));
      return tr;
    });
    const head = ["worker", "state", "host", "pod", "node", "GPU", "device", "job types", "slots in use", "current jobs", "version", "last seen"];
    set("workers", rows.length ? el("table", { id: "workers-table" }, el("thead", {}, el("tr", {}, ...head.map(h => el("th", {}, h)))), el("tbody", {}, ...rows))
      : el("p", { class: "muted", id: "no-workers" }, "No worker heard from in the last 10 minutes."));
  },
};
