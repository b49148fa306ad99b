//! Search spaces, architectures, sampling and the cost model of NASViT. No tensors here.
//!
//! `SearchSpace` holds the choices per stage; `Arch` is one subnet in the released layout
//! `{resolution, width[9], depth[7], kernel_size[7], expand_ratio[7]}` (plus optional paper genes);
//! `SubnetShape` expands an arch into every layer size, which both the cost model and the model builders read.

pub mod arch;
pub mod cost;
pub mod error;
pub mod sample;
pub mod space;

pub use arch::Arch;
pub use cost::{
    dense_cost, pyramid_levels, pyramid_multiple, pyramid_shapes, seg_head_cost, BlockShape, Cost, PyramidLevel,
    SegHeadKind, StageShape, SubnetShape, MAX_DENSE_SIDE,
};
pub use error::{ArchError, SpaceError};
pub use sample::{MacsRange, NoArchInRange};
pub use space::{
    limits, make_divisible, PaperSpace, SearchSpace, StageSpace, BUILTIN, HEAD_DIM, HEAD_EXPAND, V_EXPAND,
};
