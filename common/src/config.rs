//! Settings read from the environment, with defaults that work on a laptop.
//!
//! | variable | default |
//! |---|---|
//! | `TRAINYARD_AMQP_URL` | `amqp://guest:guest@127.0.0.1:5672/%2f` |
//! | `TRAINYARD_PREFIX` | `trainyard` (names of exchanges and queues) |
//! | `TRAINYARD_ARTIFACTS` | `./.trainyard/artifacts` |
//! | `TRAINYARD_DATA_DIR` | `./data` |

use std::path::PathBuf;

/// Default broker URL.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default artifact directory.
pub const DEFAULT_ARTIFACTS: &str = "./.trainyard/artifacts";
/// Default data directory (datasets).
pub const DEFAULT_DATA_DIR: &str = "./data";

/// Reads `name`, or `default` when unset or empty.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

/// The broker URL (`TRAINYARD_AMQP_URL`).
pub fn amqp_url() -> String {
    env_or("TRAINYARD_AMQP_URL", DEFAULT_AMQP_URL)
}

/// The topology prefix (`TRAINYARD_PREFIX`).
pub fn prefix() -> String {
    env_or("TRAINYARD_PREFIX", "trainyard")
}

/// The artifact store location (`TRAINYARD_ARTIFACTS`).
pub fn artifacts() -> String {
    env_or("TRAINYARD_ARTIFACTS", DEFAULT_ARTIFACTS)
}

/// The dataset root (`TRAINYARD_DATA_DIR`).
pub fn data_dir() -> PathBuf {
    PathBuf::from(env_or("TRAINYARD_DATA_DIR", DEFAULT_DATA_DIR))
}
