//! `nasvit import-official FILE.safetensors --out CKPT`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::Device;
use clap::Args;
use nasvit_model::{import_official, save_checkpoint};
use nasvit_space::SearchSpace;

#[derive(Args)]
pub struct ImportArgs {
    /// The released state dict (`model_ema`) converted to safetensors by `scripts/convert_official.py`.
    file: PathBuf,
    /// The space the state dict was trained in (a built-in name or a YAML/JSON file).
    #[arg(long, default_value = "official")]
    space: String,
    /// Where to write the nasvit checkpoint (safetensors with the space in its metadata).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let space = SearchSpace::load(&args.space).with_context(|| format!("loading space `{}`", args.space))?;
    let device = Device::flex();
    let net =
        import_official(&args.file, &space, &device).with_context(|| format!("importing {}", args.file.display()))?;
    let mut meta = BTreeMap::new();
    meta.insert("nasvit.source".to_string(), args.file.display().to_string());
    save_checkpoint(&net, &args.out, &meta).with_context(|| format!("writing {}", args.out.display()))?;
    let max = space.max_arch();
    println!(
        "imported {} into {} (space {}, max subnet {:.1} MMACs)",
        args.file.display(),
        args.out.display(),
        space.name,
        space.cost(&max).mmacs
    );
    Ok(())
}
