//! The live progress bar of `trainyard submit --wait` (indicatif, on stderr):
//! epoch out of epochs, loss, accuracy, throughput and an ETA from the epoch rate.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use trainyard_common::{JobEvent, JobStatus};

/// The one-line summary of a progress document (`epoch`, `loss`, `val_accuracy`, …).
pub fn progress_message(p: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    let num = |k: &str| p.get(k).and_then(serde_json::Value::as_f64);
    if let Some(v) = num("loss") {
        parts.push(format!("loss {v:.4}"));
    }
    if let Some(v) = num("val_accuracy").or_else(|| num("accuracy")) {
        parts.push(format!("acc {:.1}%", v * 100.0));
    }
    if let Some(v) = num("examples_per_s") {
        parts.push(format!("{v:.0} ex/s"));
    }
    if parts.is_empty() {
        parts.push(p.to_string());
    }
    parts.join("  ")
}

/// Follows a job's events on a progress bar.
#[derive(Debug)]
pub struct ProgressView {
    bar: ProgressBar,
}

impl ProgressView {
    /// A bar on stderr, labelled with the job.
    pub fn new(label: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} [{bar:30.cyan/blue}] epoch {pos}/{len}  {msg}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar.set_message("queued");
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Self { bar }
    }

    /// Updates the bar with an event.
    pub fn on_event(&self, ev: &JobEvent) {
        let worker = ev.worker.as_ref().map(|w| format!(" on {}", w.id)).unwrap_or_default();
        match ev.status {
            JobStatus::Queued => self.bar.set_message("queued"),
            JobStatus::Started => {
                self.bar.set_position(0);
                self.bar.reset_eta();
                self.bar.set_message(format!("attempt {}{worker}", ev.attempt));
            }
            JobStatus::Progress => {
                if let Some(p) = &ev.progress {
                    if let Some(total) = p.get("epochs").and_then(serde_json::Value::as_u64) {
                        self.bar.set_length(total.max(1));
                    }
                    if let Some(epoch) = p.get("epoch").and_then(serde_json::Value::as_u64) {
                        self.bar.set_position(epoch);
                    }
                    self.bar.set_message(progress_message(p));
                }
            }
            JobStatus::Retrying => {
                let why = ev.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
                self.bar.println(format!("attempt {} failed, retrying: {why}", ev.attempt));
            }
            s if s.is_terminal() => {
                let why = ev.error.as_ref().map(|e| format!(": {}", e.message)).unwrap_or_default();
                self.bar.abandon_with_message(format!("{s}{why}"));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_training_progress() {
        let p = serde_json::json!({"epoch": 3, "epochs": 20, "loss": 0.41234, "val_accuracy": 0.912, "examples_per_s": 12000.4});
        assert_eq!(progress_message(&p), "loss 0.4123  acc 91.2%  12000 ex/s");
        assert_eq!(progress_message(&serde_json::json!({"step": 2})), r#"{"step":2}"#);
    }
}
