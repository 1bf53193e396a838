//! Built-in job types.

pub mod noop;

use crate::handler::Registry;

/// Every job type this build knows.
pub fn builtin() -> Registry {
    Registry::new()
        .register("noop", noop::Noop)
        .register("intent-train", crate::intent::IntentTrain)
        .register("intent-eval", crate::intent::IntentEval)
}
