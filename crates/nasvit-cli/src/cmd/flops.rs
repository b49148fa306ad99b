//! `nasvit flops --space SPACE --arch ARCH [--json]`.

use anyhow::Context;
use clap::Args;
use nasvit_space::{Arch, SearchSpace};

#[derive(Args)]
pub struct FlopsArgs {
    /// A built-in space (official, paper, tiny, tiny-cnn) or a YAML/JSON file.
    #[arg(long, default_value = "official")]
    space: String,
    /// `min`, `max`, or a JSON/YAML arch file.
    #[arg(long)]
    arch: String,
    /// Print one JSON object: {"mmacs", "params", "conv_mmacs", "transformer_mmacs", "space", "arch"}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: FlopsArgs) -> anyhow::Result<()> {
    let space = SearchSpace::load(&args.space).with_context(|| format!("loading space `{}`", args.space))?;
    let arch = Arch::resolve(&args.arch, &space)?;
    let cost = space.cost(&arch);
    if args.json {
        let v = serde_json::json!({
            "mmacs": cost.mmacs,
            "params": cost.params,
            "conv_mmacs": cost.conv_mmacs,
            "transformer_mmacs": cost.transformer_mmacs,
            "space": space.name,
            "arch": arch,
        });
        println!("{v}");
    } else {
        println!(
            "{:.1} MMACs ({:.1} conv + {:.1} transformer), {:.3} M params  [space {}, resolution {}]",
            cost.mmacs,
            cost.conv_mmacs,
            cost.transformer_mmacs,
            cost.params as f64 / 1e6,
            space.name,
            arch.resolution
        );
    }
    Ok(())
}
