//! Built-in job types.

pub mod noop;

use crate::{handler::Registry, intent::device::DeviceSpec};

/// Every job type this build knows; training jobs whose `device` is `auto` use the worker's choice.
pub fn builtin() -> Registry {
    builtin_on(DeviceSpec::Auto)
}

/// Every job type this build knows, with `device` as the worker's default device.
pub fn builtin_on(device: DeviceSpec) -> Registry {
    Registry::new()
        .register("noop", noop::Noop)
        .register("intent-train", crate::intent::IntentTrain { default_device: device })
        .register("intent-eval", crate::intent::IntentEval)
}
