//! Where the burn path runs: `--device cpu|wgpu[:N]|cuda[:N]` parsed into a [`DeviceSpec`] and opened as a
//! burn [`Device`].
//!
//! The model is written against burn 0.22's run-time device API, so a GPU is a different `Device`, not a
//! different build of the model. The GPU backends are cargo features (`wgpu`, `cuda`; off by default so the
//! default build stays pure Rust): a spec whose backend was not built, or a device that does not exist, is a
//! [`DeviceError`] with what to do about it, never a panic deep inside a backend.
//!
//! | spec | device |
//! |---|---|
//! | `cpu` | burn's Flex backend (the default) |
//! | `wgpu` | wgpu's preferred adapter (a high-power GPU first; `CUBECL_WGPU_DEFAULT_DEVICE` overrides) |
//! | `wgpu:N` | the N-th discrete GPU |
//! | `wgpu:integrated[:N]` | the N-th integrated GPU |
//! | `wgpu:cpu` | wgpu's CPU adapter (Mesa's lavapipe on Linux: how CI tests the GPU code path) |
//! | `cuda`, `cuda:N` | CUDA device N (0 by default) |

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// The wgpu adapter a spec asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WgpuAdapter {
    Default,
    Discrete(usize),
    Integrated(usize),
    Cpu,
}

/// A parsed `--device` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    Cpu,
    Wgpu(WgpuAdapter),
    Cuda(usize),
}

/// Why a device could not be opened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected cpu, wgpu, wgpu:N, wgpu:integrated[:N], wgpu:cpu, cuda or cuda:N")]
    Parse(String),
    #[error(
        "--device {spec} needs the `{feature}` backend, and this nasvit was built without it: rebuild with \
         `cargo build --release -p nasvit-cli --features {feature}`"
    )]
    NotBuilt { spec: String, feature: &'static str },
    #[error("--device {spec}: no such device ({why})")]
    Unavailable { spec: String, why: String },
    #[error("--devices: {0}")]
    List(String),
}

impl DeviceSpec {
    /// Whether this is burn's CPU backend (Flex).
    pub fn is_cpu(&self) -> bool {
        matches!(self, DeviceSpec::Cpu)
    }

    /// Opens the device, checking that it exists. Opening the same spec twice gives the same device.
    pub fn open(&self) -> Result<Device, DeviceError> {
        match *self {
            DeviceSpec::Cpu => Ok(Device::flex()),
            DeviceSpec::Wgpu(adapter) => open_wgpu(self, adapter),
            DeviceSpec::Cuda(index) => open_cuda(self, index),
        }
    }

    /// Parses a comma-separated list (`--devices cuda:0,cuda:1`); duplicates of a GPU are refused, repeats of
    /// `cpu` are allowed (several workers on burn's one CPU device: the CPU test of data parallelism).
    pub fn parse_list(s: &str) -> Result<Vec<DeviceSpec>, DeviceError> {
        let specs = s
            .split(',')
            .map(|p| p.trim().parse::<DeviceSpec>())
            .collect::<Result<Vec<_>, _>>()?;
        if specs.is_empty() {
            return Err(DeviceError::List("give at least one device".into()));
        }
        for (i, a) in specs.iter().enumerate() {
            if !a.is_cpu() && specs[..i].contains(a) {
                return Err(DeviceError::List(format!("{a} appears twice")));
            }
        }
        Ok(specs)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Wgpu(WgpuAdapter::Default) => write!(f, "wgpu"),
            DeviceSpec::Wgpu(WgpuAdapter::Discrete(n)) => write!(f, "wgpu:{n}"),
            DeviceSpec::Wgpu(WgpuAdapter::Integrated(n)) => write!(f, "wgpu:integrated:{n}"),
            DeviceSpec::Wgpu(WgpuAdapter::Cpu) => write!(f, "wgpu:cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceError::Parse(s.to_string());
        let index = |t: &str| t.parse::<usize>().map_err(|_| bad());
        let lower = s.trim().to_ascii_lowercase();
        let parts: Vec<&str> = lower.split(':').collect();
        Ok(match parts.as_slice() {
            ["cpu"] | ["flex"] => DeviceSpec::Cpu,
            ["wgpu"] => DeviceSpec::Wgpu(WgpuAdapter::Default),
            ["wgpu", "cpu"] => DeviceSpec::Wgpu(WgpuAdapter::Cpu),
            ["wgpu", "integrated"] => DeviceSpec::Wgpu(WgpuAdapter::Integrated(0)),
            ["wgpu", "integrated", n] => DeviceSpec::Wgpu(WgpuAdapter::Integrated(index(n)?)),
            ["wgpu", n] => DeviceSpec::Wgpu(WgpuAdapter::Discrete(index(n)?)),
            ["cuda"] => DeviceSpec::Cuda(0),
            ["cuda", n] => DeviceSpec::Cuda(index(n)?),
            _ => return Err(bad()),
        })
    }
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu(spec: &DeviceSpec, _adapter: WgpuAdapter) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        spec: spec.to_string(),
        feature: "wgpu",
    })
}

#[cfg(feature = "wgpu")]
fn open_wgpu(spec: &DeviceSpec, adapter: WgpuAdapter) -> Result<Device, DeviceError> {
    use burn::tensor::DeviceKind;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    // burn registers one runtime per adapter and refuses a second `init` of it: the opened devices are kept so
    // that a process (a test binary, `demo`) can open the same spec again.
    static OPENED: OnceLock<Mutex<HashMap<WgpuAdapter, Device>>> = OnceLock::new();
    let opened = OPENED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut opened = opened.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = opened.get(&adapter) {
        return Ok(d.clone());
    }
    let kind = match adapter {
        WgpuAdapter::Default => DeviceKind::DefaultDevice,
        WgpuAdapter::Discrete(n) => DeviceKind::DiscreteGpu(n),
        WgpuAdapter::Integrated(n) => DeviceKind::IntegratedGpu(n),
        WgpuAdapter::Cpu => DeviceKind::Cpu,
    };
    let device = Device::wgpu_options()
        .device_kind(kind)
        .init()
        .map_err(|e| DeviceError::Unavailable {
            spec: spec.to_string(),
            why: e.to_string(),
        })?;
    opened.insert(adapter, device.clone());
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: &DeviceSpec, _index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        spec: spec.to_string(),
        feature: "cuda",
    })
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: &DeviceSpec, index: usize) -> Result<Device, DeviceError> {
    use burn::tensor::Tensor;
    // burn's CUDA device is lazy and its runtime panics when the driver or the device is missing: one small
    // tensor round trip, with the panic caught and its hook silenced, turns that into an error here.
    let device = Device::cuda(index);
    let probe = device.clone();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(move || Tensor::<1>::zeros([1], &probe).into_data());
    std::panic::set_hook(hook);
    match result {
        Ok(_) => Ok(device),
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA runtime could not start".into());
            Err(DeviceError::Unavailable {
                spec: spec.to_string(),
                why,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for (s, want) in [
            ("cpu", DeviceSpec::Cpu),
            ("wgpu", DeviceSpec::Wgpu(WgpuAdapter::Default)),
            ("wgpu:1", DeviceSpec::Wgpu(WgpuAdapter::Discrete(1))),
            ("wgpu:integrated", DeviceSpec::Wgpu(WgpuAdapter::Integrated(0))),
            ("WGPU:CPU", DeviceSpec::Wgpu(WgpuAdapter::Cpu)),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            let got: DeviceSpec = s.parse().unwrap();
            assert_eq!(got, want, "{s}");
            assert_eq!(got.to_string().parse::<DeviceSpec>().unwrap(), want);
        }
        for bad in ["", "gpu", "cuda:x", "cuda:-1", "wgpu:1:2", "cpu:0"] {
            assert!(matches!(bad.parse::<DeviceSpec>(), Err(DeviceError::Parse(_))), "{bad}");
        }
    }

    #[test]
    fn lists_refuse_a_gpu_twice_but_not_cpu_workers() {
        assert_eq!(
            DeviceSpec::parse_list("cuda:0, cuda:1").unwrap(),
            vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]
        );
        assert_eq!(DeviceSpec::parse_list("cpu,cpu").unwrap(), vec![DeviceSpec::Cpu; 2]);
        assert!(matches!(
            DeviceSpec::parse_list("cuda:0,cuda"),
            Err(DeviceError::List(_))
        ));
        assert!(DeviceSpec::parse_list("cuda:0,").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err();
        assert!(matches!(e, DeviceError::NotBuilt { feature: "cuda", .. }));
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_the_feature_says_how_to_build_it() {
        let e = "wgpu:0".parse::<DeviceSpec>().unwrap().open().unwrap_err();
        assert!(e.to_string().contains("--features wgpu"), "{e}");
    }
}
