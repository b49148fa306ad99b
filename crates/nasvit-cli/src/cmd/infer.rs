//! `nasvit infer --model DIR IMAGE...`: top-k classes of images with an exported model.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use nasvit_infer::{classify, Engine, EngineOptions};

#[derive(Args)]
pub struct InferArgs {
    /// An exported model folder (`nasvit export`).
    #[arg(long)]
    model: PathBuf,
    /// JPEG or PNG files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Classes shown per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Engine threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InferArgs) -> anyhow::Result<()> {
    let engine = Engine::load(&args.model, EngineOptions::with_threads(args.threads))
        .with_context(|| format!("loading the model {}", args.model.display()))?;
    let results = classify(&engine, &args.images, args.top);
    let mut failed = 0;
    for (path, result) in args.images.iter().zip(results) {
        match result {
            Ok(preds) => {
                if args.json {
                    let top: Vec<_> = preds
                        .iter()
                        .map(|p| serde_json::json!({"label": p.label, "index": p.index, "prob": p.prob}))
                        .collect();
                    println!("{}", serde_json::json!({"image": path, "top": top}));
                } else {
                    let text: Vec<String> = preds.iter().map(|p| format!("{} {:.3}", p.label, p.prob)).collect();
                    println!("{}: {}", path.display(), text.join(", "));
                }
            }
            Err(e) => {
                failed += 1;
                if args.json {
                    println!("{}", serde_json::json!({"image": path, "error": e.to_string()}));
                }
                eprintln!("error: {e}");
            }
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} images could not be classified",
        args.images.len()
    );
    Ok(())
}
