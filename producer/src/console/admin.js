// The Dead letters and Models views: inspect and replay dead letters, a bot's production model and its
// history with metric deltas, promote and roll back (admin scope, with a confirmation).
"use strict";

Console.views["dead-letters"] = {
  init() {
    $("dlq-filters").addEventListener("submit", ev => { ev.preventDefault(); this.load(); });
    $("dlq-replay-all").addEventListener("click", () => this.replayAll());
    $("dlq-older").addEventListener("click", () => this.load(this.next));
  },

  show() { this.load(); },

  type() { return new FormData($("dlq-filters")).get("type").trim(); },

  // The first page of letters, newest first, or with `before` (the previous page's X-Next-Cursor) the next, older one below it.
  async load(before) {
    const t = this.type();
    const params = new URLSearchParams();
    if (t) params.set("type", t);
    if (before) params.set("before", before);
    let page;
    try {
      page = await Console.call("GET", `/v1/dlq?${params}`);
    } catch (e) {
      $("error").textContent = `listing dead letters failed: ${e.message || e}`;
      return;
    }
    const body = $("dlq-table").tBodies[0];
    const rows = page.data.map(d => this.row(d));
    if (before) body.append(...rows); else body.replaceChildren(...rows);
    this.next = page.headers.get("x-next-cursor");
    $("dlq-older").hidden = !this.next;
  },

  row(d) {
    const inspect = el("button", { class: "inspect" }, "Inspect");
    const tr = el("tr", { "data-letter": d.id },
      el("td", {}, el("code", {}, d.id)), el("td", {}, d.job_type), el("td", {}, d.bot || "–"), el("td", {}, d.kind),
      el("td", { class: "num" }, d.attempt), el("td", {}, d.reason), el("td", {}, when(d.at)), el("td", {}, inspect));
    inspect.onclick = () => {
      const next = tr.nextElementSibling;
      if (next && next.classList.contains("letter-body")) { next.remove(); return; }
      // textContent: the body is shown as text, never as markup.
      tr.after(el("tr", { class: "letter-body" }, el("td", { colspan: 8 }, el("pre", { class: "body" }, bodyText(d)))));
    };
    if (Console.can("admin") && d.job_id) {
      const b = el("button", { class: "replay" }, "Replay");
      b.onclick = async () => {
        if (!(await Console.confirm(`Replay the dead letter of job ${d.job_id}?`))) return;
        const out = await Console.act(`replayed ${d.job_id}`, () => Console.api("POST", "/v1/dlq/replay", { job_id: d.job_id }).then(replayed));
        if (out) this.load();
      };
      tr.lastChild.append(" ", b);
    }
    return tr;
  },

  async replayAll() {
    const t = this.type();
    if (!t) { $("error").textContent = "name a job type to replay all of its dead letters"; return; }
    if (!(await Console.confirm(`Replay every dead letter of job type ${t}?`))) return;
    const out = await Console.act(`replayed the dead letters of ${t}`, () => Console.api("POST", "/v1/dlq/replay", { job_type: t, all: true }).then(replayed));
    if (out) this.load();
  },
};

// The API's answer to a replay, or an error when it found nothing to replay in the dead-letter queue.
function replayed(out) {
  if (!out || !Array.isArray(out.replayed) || !out.replayed.length) throw new Error("nothing was replayed: the letter is no longer in the dead-letter queue");
  return out;
}

// A letter's whole body decoded as UTF-8 (lossy) when kept, else its preview.
function bodyText(d) {
  if (!d.body) return d.body_preview;
  try {
    const bytes = Uint8Array.from(atob(d.body), c => c.charCodeAt(0));
    return new TextDecoder("utf-8", { fatal: false }).decode(bytes);
  } catch (_) {
    return d.body_preview;
  }
}

Console.views.models = {
  init() {
    $("models-form").addEventListener("submit", ev => { ev.preventDefault(); this.load(); });
  },

  show() {
    if (new FormData($("models-form")).get("bot")) this.load();
  },

  bot() { return new FormData($("models-form")).get("bot").trim(); },

  async load() {
    const bot = this.bot();
    let m;
    try {
      m = await Console.api("GET", `/v1/models/${encodeURIComponent(bot)}`);
    } catch (e) {
      $("error").textContent = `reading the models of ${bot} failed: ${e.message || e}`;
      return;
    }
    const prod = m.production;
    const parts = [el("h2", {}, `Production model of ${bot}`),
      prod ? el("div", { id: "production" }, el("a", { href: `/jobs/${prod.job_id}`, "data-internal": "" }, el("code", {}, prod.job_id)),
        ` since ${when(prod.promoted_at)} · ${prod.reason}`) : el("div", { id: "production" }, "none")];
    if (Console.can("admin")) parts.push(this.adminForm(bot, prod));
    parts.push(el("h2", {}, "History"), historyTable(m.history.records || []));
    set("models", ...parts);
  },

  // `prod`: the production entry shown; a rollback names it, so one sent twice goes back once.
  adminForm(bot, prod) {
    const f = el("form", { class: "inline", id: "promote-form" }, el("label", {}, "candidate job id ", el("input", { name: "job_id", size: 36 })),
      el("button", { type: "submit", id: "promote-candidate" }, "Promote"));
    f.onsubmit = async ev => {
      ev.preventDefault();
      const id = new FormData(f).get("job_id").trim();
      if (!id || !(await Console.confirm(`Make job ${id} the production model of ${bot}?`))) return;
      if (await Console.act(`promoted ${id}`, () => Console.api("POST", `/v1/models/promote/${encodeURIComponent(id)}`))) this.load();
    };
    if (prod) {
      const rb = el("button", { type: "button", id: "rollback", class: "danger" }, "Roll back");
      rb.onclick = async () => {
        if (!(await Console.confirm(`Roll ${bot} back from ${prod.job_id} to its previous production model?`))) return;
        const from = { from: prod.job_id };
        if (await Console.act(`rolled ${bot} back`, () => Console.api("POST", `/v1/models/${encodeURIComponent(bot)}/rollback`, from))) this.load();
      };
      f.append(" ", rb);
    }
    return f;
  },
};

// Promotions and rollbacks, newest first, with the change of each headline metric against the model before.
function historyTable(records) {
  let before = {};
  const rows = records.map(r => {
    const now = (r.to && r.to.metrics) || {};
    const delta = ["accuracy", "macro_f1"].filter(k => typeof now[k] === "number")
      .map(k => `${k} ${fmt(now[k])}` + (typeof before[k] === "number" ? ` (${now[k] >= before[k] ? "+" : ""}${(now[k] - before[k]).toFixed(4)})` : "")).join(", ");
    before = now;
    return [when(r.at), r.action, r.from || "–", r.to ? r.to.job_id : "none", delta || "–", r.reason];
  });
  return table(["when", "action", "from", "to", "metrics (Δ vs previous)", "reason"], rows.reverse(), { id: "history-table" });
}
