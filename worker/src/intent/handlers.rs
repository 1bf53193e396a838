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
// The CUDA backend's panics (out of memory above all) are caught closer to it and keep their
// own kind; any other panic on the thread is a bug ([`on_thread`]).
use crate::handler::{on_thread, JobContext, JobError, JobHandler};

/// `intent-train`: trains a bot's intent classifier and runs the promotion gate.
#[derive(Debug, Clone, Copy, Default)]
pub struct IntentTrain {
    /// The device of jobs whose `device` is `auto` (`trainyard-worker run --device`).
    pub default_device: DeviceSpec,
}

/// `intent-eval`: evaluates a stored model (a job's, or the bot's production one) on a dataset.
#[derive(Debug, Clone, Copy, Default)]
pub struct IntentEval;

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
        on_thread("intent-train", ctx.slot.clone(), move || train_job(&env, &params)).await
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
        on_thread("intent-eval", ctx.slot.clone(), move || eval_job(&env, &params)).await
    }
}
