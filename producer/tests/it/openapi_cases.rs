//! The requests of `openapi::every_route_answers_what_the_generated_document_says`: for every
//! route, one request per response the document lists (tokens: `r-tok` read, `s-tok` submit,
//! `a-tok` admin; body limit 4096 bytes). Job `a` is queued, job `b` succeeded with a model and a log.

use serde_json::json;

use crate::openapi::{case, Case};

/// The refusals of a JSON body on `route` (`path`) for `token`: 400, 413, 415 and 422.
fn body_refusals(route: &'static str, path: &str, token: &'static str, unknown: serde_json::Value) -> Vec<Case> {
    vec![
        case("POST", route, path, 400).token(token).raw("application/json", "{"),
        case("POST", route, path, 413).token(token).json(json!({"reason": "x".repeat(10_000)})),
        case("POST", route, path, 415).token(token).raw("text/plain", "{}"),
        case("POST", route, path, 422).token(token).json(unknown),
    ]
}

/// The idempotency key of a job the test submitted (bot `bot-k`, no params) before the cases.
pub const KEY: &str = "openapi-key";

/// Everything but the 503s, in an order that keeps `a` queued and `b` succeeded.
pub fn cases(a: &str, b: &str) -> Vec<Case> {
    let job = |suffix: &str| format!("/v1/jobs/{a}{suffix}");
    let mut c = vec![
        case("GET", "/healthz", "/healthz", 200),
        case("GET", "/readyz", "/readyz", 200),
        case("GET", "/metrics", "/metrics", 200),
        case("GET", "/openapi.json", "/openapi.json", 200),
        case("GET", "/", "/", 200),
        case("GET", "/jobs/{id}", format!("/jobs/{a}"), 200),
        case("GET", "/console/{file}", "/console/app.js", 200),
        case("GET", "/console/{file}", "/console/console.css", 200),
        case("GET", "/console/{file}", "/console/nope.js", 404),
        case("POST", "/v1/session", "/v1/session", 200).token("r-tok"),
        case("POST", "/v1/session", "/v1/session", 401).token("wrong"),
        case("DELETE", "/v1/session", "/v1/session", 204),
        case("GET", "/v1/stream", "/v1/stream?max_s=1", 200).token("r-tok"),
        case("GET", "/v1/stream", "/v1/stream?max_s=1", 401),
        case("GET", "/v1/stream", "/v1/stream?max_s=99", 400).token("r-tok"),
        case("POST", "/v1/jobs", "/v1/jobs", 201).token("s-tok").json(json!({"job_type": "noop", "bot": "bot-c", "params": {}})),
        case("POST", "/v1/jobs", "/v1/jobs", 200).token("s-tok").json(json!({"job_type": "noop", "bot": "bot-k", "idempotency_key": KEY})),
        case("POST", "/v1/jobs", "/v1/jobs", 409).token("s-tok").json(json!({"job_type": "noop", "bot": "bot-x", "idempotency_key": KEY})),
        case("POST", "/v1/jobs", "/v1/jobs", 400).token("s-tok").json(json!({"job_type": "noop", "bot": "bot-k", "idempotency_key": ""})),
        case("POST", "/v1/jobs", "/v1/jobs", 401).json(json!({"job_type": "noop", "bot": "bot-c"})),
        case("POST", "/v1/jobs", "/v1/jobs", 403).token("r-tok").json(json!({"job_type": "noop", "bot": "bot-c"})),
        case("GET", "/v1/jobs", "/v1/jobs?type=noop&limit=1", 200).token("r-tok"),
        case("GET", "/v1/jobs", "/v1/jobs?bogus=1", 400).token("r-tok"),
        case("GET", "/v1/jobs", "/v1/jobs?status=bogus", 400).token("r-tok"),
        case("GET", "/v1/jobs", "/v1/jobs?status=unknown", 400).token("r-tok"),
        case("GET", "/v1/jobs", "/v1/jobs?trigger=cron", 400).token("r-tok"),
        case("GET", "/v1/jobs", "/v1/jobs?limit=0", 400).token("r-tok"),
        case("GET", "/v1/jobs", "/v1/jobs?limit=10001", 400).token("r-tok"),
        case("GET", "/v1/jobs", "/v1/jobs", 401),
        case("GET", "/v1/jobs/{id}", job(""), 200).token("r-tok"),
        case("GET", "/v1/jobs/{id}", format!("/v1/jobs/{b}"), 200).token("r-tok"),
        case("GET", "/v1/jobs/{id}", "/v1/jobs/nope", 404).token("r-tok"),
        case("GET", "/v1/jobs/{id}", job(""), 401),
        case("GET", "/v1/jobs/{id}/events", job("/events"), 200).token("r-tok"),
        case("GET", "/v1/jobs/{id}/events", "/v1/jobs/nope/events", 404).token("r-tok"),
        case("GET", "/v1/jobs/{id}/events", job("/events"), 401),
        case("GET", "/v1/jobs/{id}/logs", format!("/v1/jobs/{b}/logs"), 200).token("r-tok"),
        case("GET", "/v1/jobs/{id}/logs", job("/logs"), 404).token("r-tok"),
        case("GET", "/v1/jobs/{id}/logs", job("/logs?attempt=x"), 400).token("r-tok"),
        case("GET", "/v1/jobs/{id}/logs", format!("/v1/jobs/{b}/logs?attmpt=1"), 400).token("r-tok"),
        case("GET", "/v1/jobs/{id}/logs", job("/logs"), 401),
        case("POST", "/v1/jobs/{id}/cancel", job("/cancel"), 202).token("s-tok").json(json!({"reason": "openapi test"})),
        case("POST", "/v1/jobs/{id}/cancel", format!("/v1/jobs/{b}/cancel"), 409).token("s-tok"),
        case("POST", "/v1/jobs/{id}/cancel", "/v1/jobs/nope/cancel", 400).token("s-tok"),
        case("POST", "/v1/jobs/{id}/cancel", job("/cancel"), 415).token("s-tok").raw("", r#"{"reason": "no content type"}"#),
        case("POST", "/v1/jobs/{id}/cancel", job("/cancel"), 401),
        case("POST", "/v1/jobs/{id}/cancel", job("/cancel"), 403).token("r-tok"),
        case("POST", "/v1/jobs/{id}/retry", format!("/v1/jobs/{b}/retry"), 201).token("s-tok"),
        case("POST", "/v1/jobs/{id}/retry", format!("/v1/jobs/{b}/retry"), 200).token("s-tok"),
        case("POST", "/v1/jobs/{id}/retry", "/v1/jobs/nope/retry", 404).token("s-tok"),
        case("POST", "/v1/jobs/{id}/retry", job("/retry"), 409).token("s-tok"),
        case("POST", "/v1/jobs/{id}/retry", job("/retry"), 401),
        case("POST", "/v1/jobs/{id}/retry", job("/retry"), 403).token("r-tok"),
        case("GET", "/v1/audit", "/v1/audit?actor=ci", 200).token("r-tok"),
        case("GET", "/v1/audit", "/v1/audit?limit=x", 400).token("r-tok"),
        case("GET", "/v1/audit", "/v1/audit?limit=-5", 400).token("r-tok"),
        case("GET", "/v1/audit", "/v1/audit?actr=bob", 400).token("r-tok"),
        case("GET", "/v1/audit", "/v1/audit?action=submitt", 400).token("r-tok"),
        case("GET", "/v1/audit", "/v1/audit?action=rollback", 200).token("r-tok"),
        case("GET", "/v1/audit", "/v1/audit", 401),
        case("GET", "/v1/dlq", "/v1/dlq?type=noop", 200).token("r-tok"),
        case("GET", "/v1/dlq", "/v1/dlq?job_type=noop", 400).token("r-tok"),
        case("GET", "/v1/dlq", "/v1/dlq?limit=2&before=1700000000000000:poison-x", 200).token("r-tok"),
        case("GET", "/v1/dlq", "/v1/dlq?limit=0", 400).token("r-tok"),
        case("GET", "/v1/dlq", "/v1/dlq?before=nope", 400).token("r-tok"),
        case("GET", "/v1/dlq", "/v1/dlq", 401),
        case("POST", "/v1/dlq/replay", "/v1/dlq/replay", 200).token("a-tok").json(json!({"job_type": "noop", "all": true})),
        case("POST", "/v1/dlq/replay", "/v1/dlq/replay", 404).token("a-tok").json(json!({"job_id": "nope"})),
        case("POST", "/v1/dlq/replay", "/v1/dlq/replay", 404).token("a-tok").json(json!({"job_type": "trian", "all": true})),
        case("POST", "/v1/dlq/replay", "/v1/dlq/replay", 400).token("a-tok").json(json!({"job_id": b, "all": true})),
        case("POST", "/v1/dlq/replay", "/v1/dlq/replay", 422).token("a-tok").json(json!({"job_type": "noop", "al": true})),
        case("POST", "/v1/dlq/replay", "/v1/dlq/replay", 401).json(json!({"job_id": "nope"})),
        case("POST", "/v1/dlq/replay", "/v1/dlq/replay", 403).token("s-tok").json(json!({"job_id": "nope"})),
        case("GET", "/v1/models/{bot}", "/v1/models/bot-b", 200).token("r-tok"),
        case("GET", "/v1/models/{bot}", "/v1/models/bot-b", 401),
        case("POST", "/v1/models/promote/{job_id}", format!("/v1/models/promote/{b}"), 200).token("a-tok"),
        case("POST", "/v1/models/promote/{job_id}", format!("/v1/models/promote/{a}"), 409).token("a-tok"),
        case("POST", "/v1/models/promote/{job_id}", "/v1/models/promote/nope", 404).token("a-tok"),
        case("POST", "/v1/models/promote/{job_id}", format!("/v1/models/promote/{b}"), 401),
        case("POST", "/v1/models/promote/{job_id}", format!("/v1/models/promote/{b}"), 403).token("s-tok"),
        case("GET", "/v1/models/{bot}", "/v1/models/bot-b", 200).token("r-tok"),
        case("POST", "/v1/models/{bot}/rollback", "/v1/models/bot-b/rollback", 409).token("a-tok").json(json!({"from": a})),
        case("POST", "/v1/models/{bot}/rollback", "/v1/models/bot-b/rollback", 200).token("a-tok").json(json!({"from": b})),
        case("POST", "/v1/models/{bot}/rollback", "/v1/models/bot-zzz/rollback", 409).token("a-tok"),
        case("POST", "/v1/models/{bot}/rollback", "/v1/models/bot-b/rollback", 401),
        case("POST", "/v1/models/{bot}/rollback", "/v1/models/bot-b/rollback", 403).token("s-tok"),
    ];
    for (route, path) in [
        ("/v1/queues", "/v1/queues"),
        ("/v1/workers", "/v1/workers"),
        ("/v1/schedules", "/v1/schedules"),
        ("/v1/triggers", "/v1/triggers"),
        ("/v1/bots/{bot}/usage", "/v1/bots/bot-a/usage"),
    ] {
        c.push(case("GET", route, path, 200).token("r-tok"));
        c.push(case("GET", route, path, 401));
    }
    c.push(case("POST", "/v1/jobs", "/v1/jobs", 400).token("s-tok").json(json!({"job_type": "no-such-type", "bot": "b"})));
    c.extend(body_refusals("/v1/jobs", "/v1/jobs", "s-tok", json!({"bot": "b"})));
    c.extend(body_refusals("/v1/jobs/{id}/cancel", &job("/cancel"), "s-tok", json!({"why": "unknown field"})));
    c.extend(body_refusals("/v1/models/{bot}/rollback", "/v1/models/bot-b/rollback", "a-tok", json!({"to": "unknown field"})));
    c.push(case("POST", "/v1/dlq/replay", "/v1/dlq/replay", 400).token("a-tok").json(json!({})));
    c.extend(body_refusals("/v1/dlq/replay", "/v1/dlq/replay", "a-tok", json!({"all": "yes"})));
    c
}

/// With the job store's tables dropped and the artifact store's directory a file: every 503,
/// but a plain submit, which needs only the broker (its audit record goes by the events stream).
pub fn unavailable(a: &str, b: &str) -> Vec<Case> {
    vec![
        case("GET", "/readyz", "/readyz", 503),
        case("GET", "/v1/stream", "/v1/stream?max_s=1", 503).token("r-tok"),
        case("POST", "/v1/jobs", "/v1/jobs", 201).token("s-tok").json(json!({"job_type": "noop", "bot": "bot-d"})),
        case("POST", "/v1/jobs", "/v1/jobs", 503)
            .token("s-tok")
            .json(json!({"job_type": "noop", "bot": "bot-d", "idempotency_key": "k-down"})),
        case("GET", "/v1/jobs", "/v1/jobs", 503).token("r-tok"),
        case("GET", "/v1/jobs/{id}", format!("/v1/jobs/{a}"), 503).token("r-tok"),
        case("GET", "/v1/jobs/{id}/events", format!("/v1/jobs/{a}/events"), 503).token("r-tok"),
        case("GET", "/v1/jobs/{id}/logs", format!("/v1/jobs/{b}/logs"), 503).token("r-tok"),
        case("POST", "/v1/jobs/{id}/cancel", format!("/v1/jobs/{a}/cancel"), 503).token("s-tok"),
        case("POST", "/v1/jobs/{id}/retry", format!("/v1/jobs/{b}/retry"), 503).token("s-tok"),
        case("GET", "/v1/audit", "/v1/audit", 503).token("r-tok"),
        case("GET", "/v1/dlq", "/v1/dlq", 503).token("r-tok"),
        case("POST", "/v1/dlq/replay", "/v1/dlq/replay", 503).token("a-tok").json(json!({"job_id": a})),
        case("GET", "/v1/schedules", "/v1/schedules", 503).token("r-tok"),
        case("GET", "/v1/triggers", "/v1/triggers", 503).token("r-tok"),
        case("GET", "/v1/models/{bot}", "/v1/models/bot-b", 503).token("r-tok"),
        case("POST", "/v1/models/promote/{job_id}", format!("/v1/models/promote/{b}"), 503).token("a-tok"),
        case("POST", "/v1/models/{bot}/rollback", "/v1/models/bot-b/rollback", 503).token("a-tok"),
    ]
}
