//! The `device` parameter and the burn backend it selects.
//!
//! `cpu` (default): `Autodiff<NdArray>` on all cores. `cuda` / `cuda:N`:
//! `Autodiff<Cuda>` on GPU `N`, only in builds with the `cuda` feature; asking
//! for it elsewhere is a permanent error (the job cannot succeed on this worker).

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Where to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (burn's ndarray backend).
    #[default]
    Cpu,
    /// NVIDIA GPU with this index (burn's CUDA backend).
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => Err(format!("device {other:?} is not one of cpu, cuda, cuda:N")),
            },
        }
    }

    /// Can this build use the device?
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Cpu => Ok(()),
            Self::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
            Self::Cuda(_) => Err(format!("device {self} needs a worker built with the `cuda` feature; this one is CPU-only")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(de::Error::custom)
    }
}

/// The CPU training backend.
pub type CpuBackend = burn::backend::Autodiff<burn::backend::NdArray>;

/// The CUDA training backend.
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:2"), Ok(DeviceSpec::Cuda(2)));
        assert!(DeviceSpec::parse("tpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        assert!(DeviceSpec::Cpu.check().is_ok());
        if !cfg!(feature = "cuda") {
            assert!(DeviceSpec::Cuda(0).check().unwrap_err().contains("cuda"));
        }
    }
}
