// The Queues view: per job type, ready, running, demand, consumers (workers consuming the work
// queue, from the broker), dead letters, the oldest wait, and the
// submission and completion rates between two readings pushed by the stream.
"use strict";

Console.views.queues = {
  last: null,

  show() {
    Console.api("GET", "/v1/queues").then(q => this.render(q)).catch(e => { $("error").textContent = `reading the queues failed: ${e.message || e}`; });
    Console.queueListeners = [q => this.render(q)];
  },

  render(q) {
    const now = Date.now(), prev = this.last;
    this.last = { at: now, q };
    const total = o => (o && typeof o === "object" ? Object.values(o).reduce((a, b) => a + b, 0) : o || 0);
    const rate = (t, key) => {
      if (!prev || !prev.q[t] || now === prev.at) return "–";
      return `${((total(q[t][key]) - total(prev.q[t][key])) * 60000 / (now - prev.at)).toFixed(1)}/min`;
    };
    const rows = Object.entries(q).map(([t, v]) => [t, v.ready || 0, v.running || 0, v.demand || 0, v.consumers || 0, v.dead_letters || 0,
      `${fmt(v.oldest_waiting_s || 0, 1)} s`, total(v.submitted), rate(t, "submitted"), total(v.finished), rate(t, "finished")]);
    set("queues", table(["job type", "ready", "running", "demand", "consumers", "dead letters", "oldest waiting", "submitted", "submission rate", "finished", "completion rate"], rows, { id: "queues-table" }));
  },
};
