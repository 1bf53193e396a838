//! The `device` parameter, how it resolves on a worker, and the burn backend it selects.
//!
//! A job's `device` is `auto` (default), `cpu`, `cuda` or `cuda:N`. `auto` means
//! the worker's own default (`trainyard-worker run --device` / `TRAINYARD_DEVICE`),
//! and a worker whose default is `auto` too picks the first CUDA device when it
//! was built with the `cuda` feature and a GPU is visible, else the CPU. Asking
//! for CUDA on a CPU-only build is a permanent error naming the worker: the job
//! cannot succeed there. [`resolve`] is the whole rule, as a pure function.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Where to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The worker's default device (see [`resolve`]).
    #[default]
    Auto,
    /// The CPU (burn's ndarray backend).
    Cpu,
    /// NVIDIA GPU with this index (burn's CUDA backend).
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" | "" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => Err(format!("device {other:?} is not one of auto, cpu, cuda, cuda:N")),
            },
        }
    }

    /// Is this a GPU?
    pub fn is_cuda(&self) -> bool {
        matches!(self, Self::Cuda(_))
    }
}

/// What a worker knows about itself when it resolves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// Built with the `cuda` feature?
    pub cuda_built: bool,
    /// Is an NVIDIA GPU visible to the process?
    pub gpu_visible: bool,
}

impl Host {
    /// This process.
    pub fn current() -> Self {
        Self { cuda_built: cfg!(feature = "cuda"), gpu_visible: gpu_visible() }
    }
}

/// The concrete device (`Cpu` or `Cuda(N)`) a job trains on: the job's choice, else
/// the worker's default, else the host's best. `worker` names the worker in errors.
pub fn resolve(job: DeviceSpec, worker_default: DeviceSpec, host: Host, worker: &str) -> Result<DeviceSpec, String> {
    let wanted = if job == DeviceSpec::Auto { worker_default } else { job };
    match wanted {
        DeviceSpec::Cpu => Ok(DeviceSpec::Cpu),
        DeviceSpec::Auto if host.cuda_built && host.gpu_visible => Ok(DeviceSpec::Cuda(0)),
        DeviceSpec::Auto => Ok(DeviceSpec::Cpu),
        DeviceSpec::Cuda(_) if !host.cuda_built => Err(format!(
            "device {wanted} needs a worker built with the `cuda` feature; worker {worker} is CPU-only \
             (send the job to a GPU worker, or set device to auto or cpu)"
        )),
        DeviceSpec::Cuda(_) => Ok(wanted),
    }
}

/// Is an NVIDIA GPU visible? The driver's device nodes exist and `CUDA_VISIBLE_DEVICES`
/// does not hide every device. (Checked without loading the CUDA libraries.)
pub fn gpu_visible() -> bool {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let v = v.trim();
        if v.is_empty() || v == "-1" || v.eq_ignore_ascii_case("none") || v.eq_ignore_ascii_case("void") {
            return false;
        }
    }
    std::path::Path::new("/dev/nvidia0").exists() || std::path::Path::new("/dev/nvidiactl").exists()
}

/// Bytes of GPU memory the CUDA backend has in use on `device` (`None` on the CPU).
pub fn gpu_memory_in_use(device: DeviceSpec) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            use burn::cubecl::Runtime;
            let client = burn::cubecl::cuda::CudaRuntime::client(&burn::backend::cuda::CudaDevice::new(i));
            client.memory_usage().ok().map(|u| u.bytes_in_use)
        }
        _ => None,
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
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
    use DeviceSpec::{Auto, Cpu, Cuda};

    #[test]
    fn parses_devices() {
        assert_eq!(DeviceSpec::parse("auto"), Ok(Auto));
        assert_eq!(DeviceSpec::parse("cpu"), Ok(Cpu));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:2"), Ok(Cuda(2)));
        assert!(DeviceSpec::parse("tpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
        assert_eq!(Cuda(1).to_string(), "cuda:1");
        assert_eq!(DeviceSpec::default(), Auto);
    }

    #[test]
    fn resolution_table() {
        let cpu_build = Host { cuda_built: false, gpu_visible: false };
        let cpu_build_with_gpu = Host { cuda_built: false, gpu_visible: true };
        let cuda_no_gpu = Host { cuda_built: true, gpu_visible: false };
        let cuda_gpu = Host { cuda_built: true, gpu_visible: true };
        // (job, worker default, host) → device
        let ok = [
            (Auto, Auto, cpu_build, Cpu),
            (Auto, Auto, cpu_build_with_gpu, Cpu),
            (Auto, Auto, cuda_no_gpu, Cpu),
            (Auto, Auto, cuda_gpu, Cuda(0)),
            (Auto, Cpu, cuda_gpu, Cpu),
            (Auto, Cuda(1), cuda_gpu, Cuda(1)),
            (Cpu, Cuda(0), cuda_gpu, Cpu),
            (Cuda(2), Cpu, cuda_gpu, Cuda(2)),
            (Cuda(0), Auto, cuda_no_gpu, Cuda(0)),
            (Cpu, Auto, cpu_build, Cpu),
        ];
        for (job, default, host, want) in ok {
            assert_eq!(resolve(job, default, host, "w1"), Ok(want), "{job} on a worker defaulting to {default}, {host:?}");
        }
        for (job, default) in [(Cuda(0), Auto), (Auto, Cuda(0)), (Cuda(3), Cpu)] {
            let e = resolve(job, default, cpu_build, "worker-7").unwrap_err();
            assert!(e.contains("worker-7") && e.contains("CPU-only"), "{e}");
        }
    }

    #[test]
    fn cuda_visible_devices_hides_gpus() {
        // Only the negative case is portable: no GPU on CI, and an empty list hides any.
        std::env::set_var("CUDA_VISIBLE_DEVICES", "");
        assert!(!gpu_visible());
        std::env::remove_var("CUDA_VISIBLE_DEVICES");
    }
}
