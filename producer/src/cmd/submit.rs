//! `trainyard submit`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use trainyard::submit::Submitter;
use trainyard_common::{job::Priority, topology::Topology, JobSpec, JobStatus, Trigger, TriggerKind};

/// Arguments of `trainyard submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The job type (routing key), e.g. `intent-train` or `noop`.
    job_type: String,
    /// The bot the job is for.
    #[arg(long)]
    bot: String,
    /// A parameter `key=value`; the value is read as JSON when it parses, else as a string. Repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// A JSON file with an object of parameters (`--param` overrides its keys).
    #[arg(long)]
    params_file: Option<PathBuf>,
    /// Attempts allowed in total.
    #[arg(long, default_value_t = trainyard_common::job::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// Time limit of one attempt, in seconds.
    #[arg(long = "timeout", default_value_t = trainyard_common::job::DEFAULT_TIMEOUT_S)]
    timeout_s: u64,
    /// Makes resubmissions with the same key the same job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Priority tier: `high`, `normal` or `low`. Workers never start a lower-tier job while a
    /// higher-tier one of their types is ready.
    #[arg(long, default_value = "normal")]
    priority: Priority,
    /// Latest wins per bot: coalescing key `<job_type>/<bot>` (see `--coalesce-key`).
    #[arg(long, conflicts_with = "coalesce_key")]
    coalesce: bool,
    /// Latest wins: of the jobs with this key, an older one that has not started ends
    /// `superseded` once this one is recorded by the control plane.
    #[arg(long)]
    coalesce_key: Option<String>,
    /// Follow the job and exit 0 on `succeeded`, 1 on `failed`/`dead`/`cancelled`.
    #[arg(long)]
    wait: bool,
    /// With `--wait`: give up after this many seconds (exit 3, as when the wait is cut off).
    #[arg(long, default_value_t = 24 * 3600)]
    wait_timeout: u64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Parses `--param` and `--params-file` into one JSON object.
pub fn build_params(file: Option<&PathBuf>, pairs: &[String]) -> anyhow::Result<serde_json::Value> {
    let mut params = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("failed to read params file {}", path.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("params file {} is not JSON", path.display()))?;
            anyhow::ensure!(v.is_object(), "params file {} must hold a JSON object", path.display());
            v
        }
        None => serde_json::json!({}),
    };
    for pair in pairs {
        let (k, v) = pair.split_once('=').with_context(|| format!("--param {pair:?} is not KEY=VALUE"))?;
        anyhow::ensure!(!k.is_empty(), "--param {pair:?} has an empty key");
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        params[k] = value;
    }
    Ok(params)
}

pub async fn run(url: &str, topology: Topology, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let spec = job_spec(&args)?;
    let submitter = Submitter::new(url, topology)?;
    // Subscribe before publishing so no event is missed.
    let mut watch = if args.wait { Some(submitter.watch(&spec).await?) } else { None };
    submitter.submit(&spec).await.with_context(|| format!("failed to submit {} job for bot {}", spec.job_type, spec.bot))?;
    let Some(watch) = watch.as_mut() else {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"job_id": spec.job_id, "job_type": spec.job_type, "bot": spec.bot, "status": "queued",
                "priority": spec.priority, "coalesce_key": spec.coalesce_key})
            );
        } else {
            println!("{}", spec.job_id);
        }
        return Ok(ExitCode::SUCCESS);
    };
    if !args.json {
        eprintln!("submitted {} ({} for bot {}), waiting…", spec.job_id, spec.job_type, spec.bot);
    }
    let quiet = args.json;
    // A live progress bar when a person watches; plain lines otherwise.
    let bar = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| trainyard::progress::ProgressView::new(&spec.bot));
    let outcome = watch
        .until_terminal(Duration::from_secs(args.wait_timeout), |ev| match &bar {
            Some(b) => b.on_event(ev),
            None if !quiet => print_event(ev),
            None => {}
        })
        .await;
    match outcome {
        Ok(final_event) => print_final(&spec, &final_event, args.json),
        // The job is queued whatever ended the wait: say which job it is, so that a script can
        // follow it (`jobs show`, `jobs logs --follow`) instead of submitting it again.
        Err(e) => {
            if args.json {
                println!("{}", serde_json::json!({"job_id": spec.job_id, "status": "unknown", "error": e.to_string()}));
            } else {
                eprintln!("error: job {} was submitted, but waiting for it stopped: {e}", spec.job_id);
            }
            Ok(ExitCode::from(3))
        }
    }
}

/// The job `trainyard submit` publishes: a manual trigger by `$USER`, checked before it goes.
fn job_spec(args: &SubmitArgs) -> anyhow::Result<JobSpec> {
    let params = build_params(args.params_file.as_ref(), &args.params)?;
    let who = std::env::var("USER").unwrap_or_else(|_| "cli".into());
    let mut spec = JobSpec::new(&args.job_type, &args.bot, params, Trigger { kind: TriggerKind::Manual, source: who });
    spec.max_attempts = args.max_attempts;
    spec.timeout_s = args.timeout_s;
    spec.priority = args.priority;
    spec.coalesce_key = if args.coalesce { Some(spec.bot_coalesce_key()) } else { args.coalesce_key.clone() };
    if let Some(key) = &args.idempotency_key {
        spec.set_idempotency_key(key).map_err(|e| anyhow::anyhow!("--idempotency-key: {e}"))?;
    }
    spec.validate()?;
    Ok(spec)
}

/// Prints a waited-for job's final event; exit code 0 when it succeeded, 1 otherwise.
fn print_final(spec: &JobSpec, final_event: &trainyard_common::JobEvent, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        let mut out = serde_json::json!({
            "job_id": spec.job_id, "job_type": spec.job_type, "bot": spec.bot,
            "status": final_event.status, "attempts": final_event.attempt,
        });
        if let Some(r) = &final_event.result {
            out["result"] = r.clone();
        }
        if let Some(e) = &final_event.error {
            out["error"] = serde_json::to_value(e)?;
        }
        println!("{out}");
    } else {
        println!("{} {}", spec.job_id, final_event.status);
    }
    Ok(if final_event.status == JobStatus::Succeeded { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_event(ev: &trainyard_common::JobEvent) {
    let worker = ev.worker.as_ref().map(|w| format!(" on {}", w.id)).unwrap_or_default();
    let detail = match (&ev.progress, &ev.error) {
        (Some(p), _) => format!(" {p}"),
        (_, Some(e)) => format!(" {:?}: {}", e.kind, e.message),
        _ => String::new(),
    };
    eprintln!("  {} attempt {}{worker}{detail}", ev.status, ev.attempt);
}

#[cfg(test)]
mod tests {
    use super::build_params;
    use serde_json::json;

    #[test]
    fn params_come_from_the_file_then_each_param_as_json_else_a_string() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("params.json");
        std::fs::write(&file, r#"{"epochs": 5, "dataset": "a.json"}"#).unwrap();
        let pairs = ["epochs=20", "note=hello world", "lr=0.5", "tags=[\"x\"]", "empty="].map(String::from);
        let p = build_params(Some(&file), &pairs).unwrap();
        assert_eq!(p, json!({"epochs": 20, "dataset": "a.json", "note": "hello world", "lr": 0.5, "tags": ["x"], "empty": ""}));
        assert_eq!(build_params(None, &[]).unwrap(), json!({}));
    }

    #[test]
    fn bad_params_are_refused_naming_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let (array, broken) = (dir.path().join("array.json"), dir.path().join("broken.json"));
        std::fs::write(&array, "[1, 2]").unwrap();
        std::fs::write(&broken, "{\"epochs\": ").unwrap();
        let missing = dir.path().join("missing.json");
        for (file, pairs, says) in [
            (Some(&array), vec![], "must hold a JSON object"),
            (Some(&broken), vec![], "is not JSON"),
            (Some(&missing), vec![], "failed to read params file"),
            (None, vec!["epochs".to_string()], "is not KEY=VALUE"),
            (None, vec!["=5".to_string()], "has an empty key"),
        ] {
            let e = format!("{:#}", build_params(file, &pairs).unwrap_err());
            assert!(e.contains(says), "{file:?} {pairs:?}: {e}");
        }
    }
}
