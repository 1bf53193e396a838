//! `trainyard-worker train` and `trainyard-worker predict`: run one intent job
//! locally without a broker, and query a trained model.
//!
//! `train --job-file F [--out DIR] [--resume] [--device auto|cpu|cuda[:N]]` reads a
//! job (a `JobSpec` as JSON; `job_id`, `trigger`, `submitted_at` may be left
//! out), writes every output at the top of `DIR` (default
//! `.trainyard/train/<job_id>`), prints progress per epoch and a summary. It
//! starts afresh unless `--resume` is given. The promotion gate compares with
//! the bot's production model in `TRAINYARD_ARTIFACTS` when that store exists,
//! but a local run never changes production.

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use trainyard_common::{artifacts::ArtifactStore, config, models, JobSpec};

use super::{
    device::DeviceSpec,
    env::RunEnv,
    eval::{eval_job, load_predictor, load_predictor_dir},
    params::{EvalParams, TrainParams},
    pipeline::{train_job, CHECKPOINT_KEYS},
};
use crate::handler::Progress;

/// Arguments of `trainyard-worker train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The job, as JSON (`intent-train` or `intent-eval`).
    #[arg(long)]
    pub job_file: PathBuf,
    /// Output directory (default `.trainyard/train/<job_id>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the checkpoint in the output directory instead of starting afresh.
    #[arg(long)]
    pub resume: bool,
    /// Overrides the job's `device` param: auto, cpu, cuda, cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Dataset root.
    #[arg(long, env = "TRAINYARD_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Print the result as one JSON object on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `trainyard-worker predict`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Use the bot's production model from the artifact store.
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    pub bot: Option<String>,
    /// Use the model in this directory (a `model/` folder of a run, or its parent).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The utterance(s).
    #[arg(required = true)]
    pub text: Vec<String>,
    /// How many intents to list.
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub top_k: usize,
    /// One JSON object per utterance on stdout (with `ms`, the time to answer it, model loading excluded).
    #[arg(long)]
    pub json: bool,
}

/// Reads a job file, filling what a hand-written job may leave out.
pub fn read_job_file(path: &std::path::Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("failed to read job file {}", path.display()))?;
    let mut v: Value = serde_json::from_str(&text).with_context(|| format!("job file {} is not JSON", path.display()))?;
    let obj = v.as_object_mut().context("a job file must be a JSON object")?;
    obj.entry("job_id").or_insert_with(|| Value::String(trainyard_common::job::new_job_id()));
    obj.entry("trigger").or_insert_with(|| serde_json::json!({"kind": "manual", "source": "trainyard-worker train"}));
    obj.entry("submitted_at").or_insert_with(|| Value::String(chrono::Utc::now().to_rfc3339()));
    obj.entry("bot").or_insert_with(|| Value::String("default".into()));
    // A hand-written file's stray field (`"epochs": 50` beside `params`) would be ignored by the
    // job message's forward-compatible reading: refused here, with the fields a job has.
    let known = job_fields();
    let unknown: Vec<&String> = obj.keys().filter(|k| !known.contains(k)).collect();
    if !unknown.is_empty() {
        anyhow::bail!(
            "job file {}: unknown field(s) {unknown:?}; a job has {known:?} (training settings go under \"params\")",
            path.display()
        );
    }
    let spec: JobSpec = serde_json::from_value(v).with_context(|| format!("job file {} is not a valid job", path.display()))?;
    spec.validate().with_context(|| format!("job file {} is not a valid job", path.display()))?;
    Ok(spec)
}

/// The top-level fields of a job message.
fn job_fields() -> Vec<String> {
    let trigger = trainyard_common::Trigger { kind: trainyard_common::TriggerKind::Manual, source: String::new() };
    let mut probe = JobSpec::new("t", "b", serde_json::json!({}), trigger);
    probe.idempotency_key = Some(String::new());
    probe.coalesce_key = Some(String::new());
    serde_json::to_value(&probe).ok().and_then(|v| v.as_object().map(|o| o.keys().cloned().collect())).unwrap_or_default()
}

fn print_epoch(p: &Value) {
    let f = |k: &str| p.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    eprintln!(
        "{:<4} {:<6} epoch {:>3}/{:<3} loss {:.4}  val_acc {:.4}  {:>7.0} ex/s  {:.2}s",
        s("model"),
        s("device"),
        f("epoch"),
        f("epochs"),
        f("loss"),
        f("val_accuracy"),
        f("examples_per_s"),
        f("epoch_seconds")
    );
}

fn pct(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_f64).map_or("-".into(), |x| format!("{:.2}%", x * 100.0))
}

/// `trainyard-worker train`.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let mut spec = read_job_file(&args.job_file)?;
    if let Some(d) = &args.device {
        DeviceSpec::parse(d).map_err(anyhow::Error::msg)?;
        spec.params.as_object_mut().context("params must be an object")?.insert("device".into(), Value::String(d.clone()));
    }
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(".trainyard/train").join(&spec.job_id));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let store = ArtifactStore::open(out.to_str().context("output path is not UTF-8")?)?;
    let models_dir = config::artifacts();
    let models = std::path::Path::new(&models_dir).is_dir().then(|| ArtifactStore::open(&models_dir)).transpose()?;
    let (progress, mut rx) = Progress::channel();
    let cancel = CancellationToken::new();
    let mut env = RunEnv::new(
        store.clone(),
        "",
        models,
        args.data_dir.clone(),
        spec.job_id.clone(),
        spec.bot.clone(),
        cancel.clone(),
        progress,
        rt.handle().clone(),
    );
    env.apply_promotion = false;
    env.resume = args.resume;
    if !args.resume {
        for key in CHECKPOINT_KEYS {
            rt.block_on(store.delete(key))?;
        }
    }
    eprintln!("{} job {} (bot {:?}) → {}", spec.job_type, spec.job_id, spec.bot, out.display());
    let job_type = spec.job_type.clone();
    let params = spec.params.clone();
    let worker = std::thread::Builder::new().name(job_type.clone()).spawn(move || match job_type.as_str() {
        "intent-train" => TrainParams::parse(&params).and_then(|p| train_job(&env, &p)),
        "intent-eval" => EvalParams::parse(&params).and_then(|p| eval_job(&env, &p)),
        other => Err(crate::handler::JobError::permanent(format!("`train` runs intent-train or intent-eval jobs, not {other:?}"))),
    })?;
    rt.block_on(print_progress(&mut rx, &cancel));
    let outcome = worker.join().map_err(|_| anyhow::anyhow!("the training thread panicked"))?;
    let res = match outcome {
        Ok(v) => v,
        Err(e) => bail!("{} job {} failed ({:?}): {}", spec.job_type, spec.job_id, e.kind, e.message),
    };
    if args.json {
        println!("{}", serde_json::to_string(&res)?);
        return Ok(());
    }
    print_summary(&spec, &res, &out);
    Ok(())
}

/// Prints each epoch as it ends until the run ends; Ctrl-C stops it at the next batch.
async fn print_progress(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>, cancel: &CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => print_epoch(&p),
                None => break,
            },
            _ = &mut ctrl_c => { eprintln!("interrupted: stopping at the next batch (rerun with --resume to continue)"); cancel.cancel(); }
        }
    }
}

/// The result of a local run, for people.
fn print_summary(spec: &JobSpec, res: &Value, out: &std::path::Path) {
    println!("{} job {} (bot {}) finished", spec.job_type, spec.job_id, spec.bot);
    println!("  accuracy           {}", pct(res, "accuracy"));
    println!("  macro-F1           {}", pct(res, "macro_f1"));
    if res.get("in_scope_accuracy").is_some_and(|v| !v.is_null()) {
        println!("  in-scope accuracy  {}", pct(res, "in_scope_accuracy"));
        println!("  OOS recall         {}", pct(res, "oos_recall"));
    }
    if let Some(e) = res.get("epochs_run") {
        let resumed =
            res.get("resumed_from_epoch").filter(|v| !v.is_null()).map(|v| format!(", resumed from epoch {v}")).unwrap_or_default();
        println!("  epochs             {e} (best {}){resumed}", res["best_epoch"]);
    }
    println!("  model, device      {}, {}", res["model_kind"].as_str().unwrap_or("-"), res["device"].as_str().unwrap_or("-"));
    if let Some(s) = res.get("seconds").and_then(Value::as_f64) {
        println!("  wall time          {s:.1}s");
    }
    if let Some(c) = res.get("top_confusions").and_then(Value::as_array) {
        println!("  top confusions:");
        for x in c {
            println!("    {:<28} -> {:<28} {}x", x["label"].as_str().unwrap_or(""), x["predicted"].as_str().unwrap_or(""), x["count"]);
        }
    }
    if let Some(p) = res.get("promotion") {
        let verdict = if p["promoted"].as_bool() == Some(true) {
            "promoted"
        } else if p["passed"].as_bool() == Some(true) {
            "passed (not promoted: local run)"
        } else {
            "rejected"
        };
        println!("  promotion gate     {verdict}");
        for r in p["reasons"].as_array().into_iter().flatten() {
            println!("    - {}", r.as_str().unwrap_or(""));
        }
    }
    println!("  outputs            {}/ (metrics.json, confusion_matrix.json, confusion_matrix.png, model/, training.log)", out.display());
}

/// `trainyard-worker predict`.
pub fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let predictor = match (&args.model, &args.bot) {
        (Some(dir), _) => load_predictor_dir(dir).map_err(anyhow::Error::msg)?,
        (None, Some(bot)) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let store = ArtifactStore::from_env()?;
            let prod = rt.block_on(models::production(&store, bot))?.with_context(|| format!("bot {bot:?} has no production model"))?;
            load_predictor(rt.handle(), &store, &prod.model).map_err(|e| anyhow::anyhow!(e.message))?
        }
        (None, None) => bail!("give --bot or --model"),
    };
    for text in &args.text {
        let t0 = std::time::Instant::now();
        let (decision, top) = predictor.top_k(text, args.top_k);
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if args.json {
            println!("{}", serde_json::json!({"text": text, "intent": decision, "top": top, "ms": ms}));
        } else {
            println!("{text:?} → {decision}");
            for s in top {
                println!("  {:<32} {:.4}", s.intent, s.probability);
            }
        }
    }
    Ok(())
}
