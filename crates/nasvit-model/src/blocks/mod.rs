//! Blocks of the supernet: MBConv blocks and NASViT transformer layers share one `blocks.{i}` list.

pub mod attention;
pub mod mbconv;
pub mod mlp;
pub mod rpb;
pub mod transformer;

use burn::module::Module;

pub use attention::Attention;
pub use mbconv::{DepthConv, MbBlock, MbConv, Shortcut};
pub use mlp::Mlp;
pub use transformer::TransformerBlock;

/// One entry of `blocks`. The variant adds no level to the key tree: `blocks.3.mobile_inverted_conv...`,
/// `blocks.7.attn...`.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Block {
    MbConv(MbBlock),
    Transformer(TransformerBlock),
}
