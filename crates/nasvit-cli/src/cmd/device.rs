//! `--device` of the commands that run the burn model (train, eval, search, conflict, bench-train).

use burn::tensor::Device;
use clap::Args;
use nasvit_model::DeviceSpec;
use nasvit_train::EngineKind;

pub const DEVICE_HELP: &str = "Where the burn model runs: cpu (default; burn's Flex backend), wgpu (the preferred \
    GPU), wgpu:N (N-th discrete GPU), wgpu:cpu (wgpu's CPU adapter, e.g. Mesa's lavapipe), cuda / cuda:N. GPUs need \
    a build with `--features wgpu` or `--features cuda`; a device other than cpu selects the burn engine.";

#[derive(Args, Clone, Debug)]
pub struct DeviceArg {
    #[arg(long, value_name = "DEVICE", default_value = "cpu", help = DEVICE_HELP)]
    pub device: DeviceSpec,
}

impl DeviceArg {
    /// The device, opened (a clear error when its backend was not built or it does not exist).
    pub fn open(&self) -> anyhow::Result<Device> {
        Ok(self.device.open()?)
    }

    /// `engine` given this device: the cpu engine is for `--device cpu` only, `auto` on a GPU is burn.
    pub fn engine(&self, engine: EngineKind) -> anyhow::Result<EngineKind> {
        match (engine, self.device.is_cpu()) {
            (_, true) => Ok(engine),
            (EngineKind::Cpu, false) => anyhow::bail!(
                "--engine cpu runs on this machine's cores; --device {} needs --engine burn (or auto)",
                self.device
            ),
            (_, false) => Ok(EngineKind::Burn),
        }
    }
}
