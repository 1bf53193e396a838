//! Child processes of a benchmark (workers, recorder, baselines) and what
//! `/proc` says about them: resident memory and CPU time.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context;
use tokio::process::{Child, Command};

/// Where the benchmark finds binaries and writes logs and scratch data.
#[derive(Debug, Clone)]
pub struct Env {
    /// Broker URL.
    pub amqp_url: String,
    /// Directory holding `trainyard` and `trainyard-worker`.
    pub bin_dir: PathBuf,
    /// Scratch directory (job stores, logs).
    pub work_dir: PathBuf,
    /// Where each run's artifact store goes (`<root>/<prefix>/artifacts`).
    pub artifacts_root: PathBuf,
}

/// A named child process.
#[derive(Debug)]
pub struct Proc {
    /// What it is, e.g. `worker-0`.
    pub name: String,
    child: Child,
}

impl Proc {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

impl Env {
    /// Starts `program args` with `envs`, stdout and stderr to `<work_dir>/logs/<name>.log`.
    pub fn spawn(&self, name: &str, program: &Path, args: &[&str], envs: &[(&str, String)]) -> anyhow::Result<Proc> {
        let logs = self.work_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("TRAINYARD_AMQP_URL", &self.amqp_url)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("failed to start {}", program.display()))?;
        Ok(Proc { name: name.to_string(), child })
    }

    /// A binary of the release build.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// Stops processes: SIGTERM, up to 10 s to exit, then SIGKILL.
pub async fn stop(procs: &mut Vec<Proc>) {
    for p in procs.iter() {
        let _ = Command::new("kill").arg("-TERM").arg(p.pid().to_string()).status().await;
    }
    for mut p in procs.drain(..) {
        if tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await.is_err() {
            eprintln!("{} did not stop on SIGTERM; killing it", p.name);
            let _ = p.child.kill().await;
        }
    }
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// User + system CPU time of a process so far, in seconds (`pid` 0 = this process).
pub fn cpu_s(pid: u32) -> Option<f64> {
    let path = if pid == 0 { "/proc/self/stat".to_string() } else { format!("/proc/{pid}/stat") };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The process id of the broker (`beam.smp`), to account its CPU time.
pub fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// CPU seconds of a set of processes, to compare before and after a run.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    pids: Vec<(String, u32, f64)>,
}

impl CpuMeter {
    /// Starts measuring `procs`, this process (`bench`) and the broker.
    pub fn start(procs: &[Proc]) -> Self {
        let mut pids: Vec<(String, u32)> = procs.iter().map(|p| (p.name.clone(), p.pid())).collect();
        pids.push(("bench".into(), 0));
        if let Some(b) = broker_pid() {
            pids.push(("broker".into(), b));
        }
        Self { pids: pids.into_iter().map(|(n, p)| (n, p, cpu_s(p).unwrap_or(0.0))).collect() }
    }

    /// CPU microseconds per job of each group (name up to the first `-`), since `start`.
    pub fn per_job_us(&self, jobs: usize) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, pid, before) in &self.pids {
            let used = cpu_s(*pid).unwrap_or(*before) - before;
            let group = name.split('-').next().unwrap_or(name).to_string();
            let e = out.entry(group).or_insert(serde_json::json!(0.0));
            let v = e.as_f64().unwrap_or(0.0) + used * 1e6 / jobs.max(1) as f64;
            *e = serde_json::json!((v * 10.0).round() / 10.0);
        }
        serde_json::Value::Object(out)
    }
}
