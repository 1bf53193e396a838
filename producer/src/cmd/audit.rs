//! `trainyard audit`: the audit trail of operator actions, newest first.

use std::process::ExitCode;

use clap::Args;
use trainyard::store::AuditFilter;
use trainyard_common::topology::Topology;

use super::manage::{open, print, s, Conn, Target};

/// Filters of `trainyard audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this actor (API token name, or CLI user).
    #[arg(long)]
    actor: Option<String>,
    /// Only this action: submit, cancel, retry, replay, promote, rollback.
    #[arg(long)]
    action: Option<String>,
    /// Only this target (a job id or bot).
    #[arg(long)]
    target: Option<String>,
    /// At most this many records.
    #[arg(long, default_value_t = 100)]
    limit: i64,
}

pub async fn run(t: Target, url: &str, topology: Topology, a: AuditArgs) -> anyhow::Result<ExitCode> {
    let conn = open(&t, url, topology).await?;
    let filter = AuditFilter { actor: a.actor, action: a.action, target: a.target, limit: a.limit };
    let v = match &conn {
        Conn::Direct(ops) => serde_json::to_value(ops.audit_trail(&filter).await?)?,
        Conn::Remote { .. } => {
            let pairs = [("actor", &filter.actor), ("action", &filter.action), ("target", &filter.target)];
            let mut url = reqwest::Url::parse("http://query/").expect("a constant URL");
            url.query_pairs_mut().extend_pairs(pairs.iter().filter_map(|(k, v)| Some((k, v.as_deref()?))));
            url.query_pairs_mut().append_pair("limit", &filter.limit.to_string());
            conn.get(&format!("/audit?{}", url.query().unwrap_or(""))).await?
        }
    };
    print(t.json, &v, |v| {
        println!("{:<27}  {:<16}  {:<9}  {:<36}  DETAIL", "AT", "ACTOR", "ACTION", "TARGET");
        for r in v.as_array().into_iter().flatten() {
            let detail = if r["detail"].is_null() { String::new() } else { r["detail"].to_string() };
            println!("{:<27}  {:<16}  {:<9}  {:<36}  {detail}", s(&r["at"]), s(&r["actor"]), s(&r["action"]), s(&r["target"]));
        }
    });
    Ok(ExitCode::SUCCESS)
}
