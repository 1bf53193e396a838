//! The `intent-train` and `intent-eval` job types.
//!
//! Both parse their params up front (an error is permanent) and run the
//! pipeline on a dedicated OS thread, never on the async runtime; the thread
//! reaches the artifact store through the runtime handle and stops at the next
//! batch once `ctx.cancel` fires.

use async_trait::async_trait;

use super::{
    device::DeviceSpec,
    env::RunEnv,
    eval::eval_job,
    params::{EvalParams, TrainParams},
    pipeline::train_job,
};
use crate::handler::{JobContext, JobError, JobHandler};

/// `intent-train`: trains a bot's intent classifier and runs the promotion gate.
#[derive(Debug, Clone, Copy, Default)]
pub struct IntentTrain {
    /// The device of jobs whose `device` is `auto` (`trainyard-worker run --device`).
    pub default_device: DeviceSpec,
}

/// `intent-eval`: evaluates a stored model (a job's, or the bot's production one) on a dataset.
#[derive(Debug, Clone, Copy, Default)]
pub struct IntentEval;

/// Runs `f` on a new OS thread and awaits its result. A panic there is a bug: the job ends
/// `dead` with its message ([`JobError::panicked`]); the CUDA backend's panics (out of memory
/// above all) are caught closer to it and keep their own kind.
pub async fn on_thread<F>(name: &str, f: F) -> Result<serde_json::Value, JobError>
where
    F: FnOnce() -> Result<serde_json::Value, JobError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(result.unwrap_or_else(|p| Err(JobError::panicked(&*p))));
        })
        .map_err(|e| JobError::transient(format!("failed to start the {name} thread: {e}")))?;
    rx.await.unwrap_or_else(|_| Err(JobError::transient(format!("the {name} thread panicked"))))
}

#[async_trait]
impl JobHandler for IntentTrain {
    fn validate(&self, params: &serde_json::Value) -> Result<(), JobError> {
        TrainParams::parse(params).map(|_| ())
    }

    async fn run(&self, ctx: JobContext) -> Result<serde_json::Value, JobError> {
        let params = TrainParams::parse(&ctx.spec.params)?;
        let mut env = RunEnv::from_ctx(&ctx);
        env.default_device = self.default_device;
        if ctx.redelivery > 0 {
            env.log(format!("redelivered (count {}): continuing from the last checkpoint if any", ctx.redelivery));
        }
        on_thread("intent-train", move || train_job(&env, &params)).await
    }
}

#[async_trait]
impl JobHandler for IntentEval {
    fn validate(&self, params: &serde_json::Value) -> Result<(), JobError> {
        EvalParams::parse(params).map(|_| ())
    }

    async fn run(&self, ctx: JobContext) -> Result<serde_json::Value, JobError> {
        let params = EvalParams::parse(&ctx.spec.params)?;
        let env = RunEnv::from_ctx(&ctx);
        on_thread("intent-eval", move || eval_job(&env, &params)).await
    }
}
