//! The NASViT supernet and its extracted subnets on burn 0.22 (Flex CPU backend or any burn device).
//!
//! - [`Supernet`]: weight-sharing supernet with the released checkpoint's key tree; [`Supernet::set_active`]
//!   picks a subnet, [`Supernet::forward`] (training mode), [`Supernet::forward_eval`], [`Supernet::features`].
//! - [`StaticNet`]: a subnet extracted with [`Supernet::extract`], inference only.
//! - Checkpoints: [`save_checkpoint`], [`load_checkpoint`], [`import_official`], and BN statistics override
//!   [`Supernet::set_bn_stats`]; BN re-calibration of a subnet, [`Supernet::calibrate_bn`].
//! - Segmentation: [`Supernet::pyramid`] / [`StaticNet::pyramid`] (4 levels of a dense input) and [`seg::SegModel`]
//!   (backbone + SegFormer-style or LR-ASPP head).

pub mod blocks;
pub mod calibrate;
pub mod checkpoint;
pub mod conv_bn;
pub mod device;
pub mod elastic;
pub mod error;
pub mod head;
pub mod init;
pub mod named;
pub mod net;
pub mod seg;
pub mod static_net;
pub mod supernet;

pub use calibrate::{Calibration, DEFAULT_CALIB_BATCHES};
pub use checkpoint::{import_official, is_ignored_key, load_checkpoint, read_metadata, save_checkpoint};
pub use device::{DeviceError, DeviceSpec, WgpuAdapter};
pub use elastic::Mode;
pub use error::ModelError;
pub use init::ParamInit;
pub use named::{named_grads, named_shapes, named_tensors};
pub use net::{pyramid_levels, pyramid_multiple, resize_input, Features};
pub use static_net::StaticNet;
pub use supernet::{supernet_floats, Supernet, SupernetConfig, MAX_SUPERNET_FLOATS};
