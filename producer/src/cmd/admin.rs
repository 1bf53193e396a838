//! `trainyard dlq|models|events`: dead letters, bots' production models and parked events,
//! through the store and the broker directly, or (but `events`) through the API.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use serde_json::json;
use trainyard::{
    ops::ReplayRequest,
    store::{JobCursor, Store},
};
use trainyard_common::topology::Topology;

use super::manage::{open, print, s, seg, who, Conn, Target};

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// Dead letters not replayed yet.
    List {
        #[arg(long = "type")]
        job_type: Option<String>,
        /// The next page: the cursor printed after a full page (`next page: --before …`).
        #[arg(long)]
        before: Option<JobCursor>,
        /// Letters per page, newest first (1 to 10,000).
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Republish dead letters with a fresh attempt count.
    Replay {
        /// The job to replay.
        id: Option<String>,
        /// Replay every dead letter of `--type`.
        #[arg(long, requires = "job_type")]
        all: bool,
        #[arg(long = "type")]
        job_type: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelsCmd {
    /// A bot's production model and promotion history.
    List {
        #[arg(long)]
        bot: String,
    },
    /// Make the model a job trained its bot's production model.
    Promote { job_id: String },
    /// Restore the bot's previous production model.
    Rollback {
        #[arg(long)]
        bot: String,
        /// Only while this job's model is the production one (a rollback run twice, or by two
        /// people at once, then goes back once).
        #[arg(long, value_name = "JOB_ID")]
        from: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCmd {
    /// Parked events, oldest first: reason, routing key, when, and the body as base64.
    Parked,
    /// Record every parked event this build can now read (after an upgrade); the rest stay parked.
    Reprocess,
}

pub async fn dlq(t: Target, url: &str, topology: Topology, cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    let conn = open(&t, url, topology).await?;
    match cmd {
        DlqCmd::List { job_type, before, limit } => {
            let (v, next) = match &conn {
                Conn::Direct(ops) => {
                    let (letters, next) = ops.dead_letters(job_type.as_deref(), before.as_ref(), limit).await?;
                    (serde_json::to_value(letters)?, next.map(|c| c.to_string()))
                }
                Conn::Remote { .. } => {
                    let mut query = format!("/dlq?limit={limit}");
                    for (k, v) in [("type", job_type), ("before", before.map(|c| c.to_string()))] {
                        if let Some(v) = v {
                            query.push_str(&format!("&{k}={}", seg(&v)));
                        }
                    }
                    conn.get_paged(&query).await?
                }
            };
            if let Some(c) = &next {
                eprintln!("next page: --before {c}");
            }
            print(t.json, &v, |v| {
                println!("{:<43}  {:<13}  {:<14}  {:>3}  REASON", "ID", "TYPE", "KIND", "ATT");
                for d in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<43}  {:<13}  {:<14}  {:>3}  {}",
                        s(&d["id"]),
                        s(&d["job_type"]),
                        s(&d["kind"]),
                        s(&d["attempt"]),
                        s(&d["reason"])
                    );
                }
            });
        }
        DlqCmd::Replay { id, all, job_type } => {
            if id.is_none() && !all {
                bail!("give a job id, or --all --type T");
            }
            let req = ReplayRequest { job_id: id, job_type, all };
            let v = match &conn {
                Conn::Direct(ops) => json!({"replayed": ops.replay(&req, &who()).await?}),
                Conn::Remote { .. } => conn.post("/dlq/replay", serde_json::to_value(&req)?).await?,
            };
            print(t.json, &v, |v| {
                for id in v["replayed"].as_array().into_iter().flatten() {
                    println!("replayed {}", s(id));
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn models(t: Target, url: &str, topology: Topology, cmd: ModelsCmd) -> anyhow::Result<ExitCode> {
    let conn = open(&t, url, topology).await?;
    let v = match (&conn, cmd) {
        (Conn::Direct(ops), ModelsCmd::List { bot }) => serde_json::to_value(ops.models(&bot).await?)?,
        (Conn::Direct(ops), ModelsCmd::Promote { job_id }) => serde_json::to_value(ops.promote(&job_id, &who()).await?.0)?,
        (Conn::Direct(ops), ModelsCmd::Rollback { bot, from }) => {
            json!({"bot": bot, "production": ops.rollback(&bot, &who(), from.as_deref()).await?})
        }
        (Conn::Remote { .. }, ModelsCmd::List { bot }) => conn.get(&format!("/models/{}", seg(&bot))).await?,
        (Conn::Remote { .. }, ModelsCmd::Promote { job_id }) => conn.post(&format!("/models/promote/{}", seg(&job_id)), json!({})).await?,
        (Conn::Remote { .. }, ModelsCmd::Rollback { bot, from }) => {
            conn.post(&format!("/models/{}/rollback", seg(&bot)), json!({"from": from})).await?
        }
    };
    print(t.json, &v, |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()));
    Ok(ExitCode::SUCCESS)
}

pub async fn events(t: Target, cmd: EventsCmd) -> anyhow::Result<ExitCode> {
    if t.server.is_some() {
        bail!("`trainyard events` reads the job store directly (TRAINYARD_DATABASE_URL); it is not served by the API");
    }
    let store = Store::open(&t.database_url).await?;
    match cmd {
        EventsCmd::Parked => {
            let v = serde_json::to_value(store.parked_events().await?)?;
            print(t.json, &v, |v| {
                println!("{:<36}  {:<24}  {:<30}  REASON", "ID", "AT", "ROUTING_KEY");
                for p in v.as_array().into_iter().flatten() {
                    println!("{:<36}  {:<24}  {:<30}  {}", s(&p["id"]), s(&p["at"]), s(&p["routing_key"]), s(&p["reason"]));
                }
            });
        }
        EventsCmd::Reprocess => {
            let (recorded, parked) =
                store.reprocess_parked(|p, body| trainyard::audit::decode_parked(&p.routing_key, p.content_type.as_deref(), body)).await?;
            let v = json!({"recorded": recorded, "still_parked": parked});
            print(t.json, &v, |_| println!("recorded {recorded} parked event(s); {parked} still parked"));
        }
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}
