//! `nasvit flops --space SPACE --arch ARCH [--json]`, and the segmentation count
//! `nasvit flops --task seg --head segformer|lraspp --size HxW [--embed E] [--inter I] [--classes K]`.

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use nasvit_space::{
    dense_cost, pyramid_levels, pyramid_multiple, pyramid_shapes, seg_head_cost, Arch, SearchSpace, SegHeadKind,
    MAX_DENSE_SIDE,
};

#[derive(Args)]
pub struct FlopsArgs {
    /// A built-in space (official, paper, tiny, tiny-cnn) or a YAML/JSON file.
    #[arg(long, default_value = "official")]
    space: String,
    /// `min`, `max`, or a JSON/YAML arch file.
    #[arg(long)]
    arch: String,
    /// `cls`: the classification subnet at its own resolution. `seg`: the segmentation backbone (stem to the last
    /// pyramid stage, no classification head) on a `--size` input, plus a `--head`.
    #[arg(long, value_enum, default_value = "cls")]
    task: Task,
    /// Segmentation head (with `--task seg`).
    #[arg(long, value_enum)]
    head: Option<Head>,
    /// Segmentation input `HxW` (with `--task seg`), e.g. 512x1024: multiples of the space's pyramid multiple (32
    /// for official), not resized.
    #[arg(long)]
    size: Option<String>,
    /// SegFormer embedding width [default: 256].
    #[arg(long)]
    embed: Option<usize>,
    /// LR-ASPP inter channels [default: 128].
    #[arg(long)]
    inter: Option<usize>,
    /// Segmentation classes [default: 19, Cityscapes].
    #[arg(long)]
    classes: Option<usize>,
    /// Print one JSON object: {"mmacs", "params", "conv_mmacs", "transformer_mmacs", "space", "arch"}; with
    /// `--task seg` {"task", "head", "size", "backbone_mmacs", "head_mmacs", "mmacs", "params", ..}.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Task {
    Cls,
    Seg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Head {
    Segformer,
    Lraspp,
}

/// Widest head and most classes accepted: the bounds `nasvit_model::seg::SegConfig` loads.
const MAX_HEAD_WIDTH: usize = 4096;
const MAX_CLASSES: usize = 65_536;

pub fn run(args: FlopsArgs) -> anyhow::Result<()> {
    let space = SearchSpace::load(&args.space).with_context(|| format!("loading space `{}`", args.space))?;
    let arch = Arch::resolve(&args.arch, &space)?;
    if args.task == Task::Seg {
        return run_seg(&args, &space, &arch);
    }
    // the segmentation options mean nothing to the classification count: refuse them rather than ignore them
    let seg_only = [
        ("--head", args.head.is_some()),
        ("--size", args.size.is_some()),
        ("--embed", args.embed.is_some()),
        ("--inter", args.inter.is_some()),
        ("--classes", args.classes.is_some()),
    ];
    if let Some((flag, _)) = seg_only.iter().find(|(_, given)| *given) {
        bail!("{flag} applies to `--task seg` only");
    }
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

/// `HxW` -> (H, W).
fn parse_size(text: &str) -> anyhow::Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--size `{text}`: expected HxW, e.g. 512x1024");
    let (h, w) = text.split_once(['x', 'X']).ok_or_else(bad)?;
    Ok((
        h.trim().parse().map_err(|_| bad())?,
        w.trim().parse().map_err(|_| bad())?,
    ))
}

fn run_seg(args: &FlopsArgs, space: &SearchSpace, arch: &Arch) -> anyhow::Result<()> {
    let head = args
        .head
        .context("--task seg needs --head segformer or --head lraspp")?;
    let size = args
        .size
        .as_deref()
        .context("--task seg needs --size HxW, e.g. 512x1024")?;
    let (h, w) = parse_size(size)?;
    let m = pyramid_multiple(space);
    // the cap first: it keeps the suggested sizes below from overflowing
    if h > MAX_DENSE_SIDE || w > MAX_DENSE_SIDE {
        bail!("--size {h}x{w}: at most {MAX_DENSE_SIDE} a side");
    }
    if h == 0 || w == 0 || h % m != 0 || w % m != 0 {
        let deepest = pyramid_levels(space).last().map_or(1, |l| l.1);
        let why = if m == deepest {
            "the deepest pyramid stride"
        } else {
            "twice the first transformer stage's stride: its 2x2 attention windows need an even token map"
        };
        bail!(
            "--size {h}x{w}: H and W must be positive multiples of {m} in space `{}` ({why}); e.g. {}x{}",
            space.name,
            h.div_ceil(m).max(1) * m,
            w.div_ceil(m).max(1) * m
        );
    }
    let levels = pyramid_shapes(space, arch, h, w);
    let [l0, l1, l2, l3] = levels[..] else {
        bail!(
            "space `{}` has {} pyramid levels (strides past the stem's); a segmentation head needs 4",
            space.name,
            levels.len()
        );
    };
    if head == Head::Segformer && args.inter.is_some() {
        bail!("--inter applies to --head lraspp; SegFormer's width is --embed");
    }
    if head == Head::Lraspp && args.embed.is_some() {
        bail!("--embed applies to --head segformer; LR-ASPP's width is --inter");
    }
    let kind = match head {
        Head::Segformer => SegHeadKind::Segformer {
            embed: args.embed.unwrap_or(256),
        },
        Head::Lraspp => SegHeadKind::Lraspp {
            inter: args.inter.unwrap_or(128),
        },
    };
    let width = match kind {
        SegHeadKind::Segformer { embed } => embed,
        SegHeadKind::Lraspp { inter } => inter,
    };
    if !(1..=MAX_HEAD_WIDTH).contains(&width) {
        bail!("head width {width} outside 1..{MAX_HEAD_WIDTH}");
    }
    let classes = args.classes.unwrap_or(19);
    if !(1..=MAX_CLASSES).contains(&classes) {
        bail!("--classes {classes} outside 1..{MAX_CLASSES}");
    }

    let backbone = dense_cost(space, arch, h, w);
    let head_cost = seg_head_cost(
        kind,
        [l0.channels, l1.channels, l2.channels, l3.channels],
        [(l0.h, l0.w), (l1.h, l1.w), (l2.h, l2.w), (l3.h, l3.w)],
        classes,
    );
    let mmacs = backbone.mmacs + head_cost.mmacs;
    let params = backbone.params + head_cost.params;
    let last_stage = &space.stages[l3.stage].name;
    if args.json {
        let v = serde_json::json!({
            "task": "seg",
            "head": kind.name(),
            "head_config": kind,
            "size": [h, w],
            "classes": classes,
            "backbone_mmacs": backbone.mmacs,
            "backbone_conv_mmacs": backbone.conv_mmacs,
            "backbone_transformer_mmacs": backbone.transformer_mmacs,
            "head_mmacs": head_cost.mmacs,
            "mmacs": mmacs,
            "backbone_params": backbone.params,
            "head_params": head_cost.params,
            "params": params,
            "levels": levels,
            "space": space.name,
            "arch": arch,
        });
        println!("{v}");
    } else {
        println!(
            "backbone (first_conv .. {last_stage}): {:.1} MMACs ({:.1} conv + {:.1} transformer), {:.3} M params",
            backbone.mmacs,
            backbone.conv_mmacs,
            backbone.transformer_mmacs,
            backbone.params as f64 / 1e6
        );
        let detail = match kind {
            SegHeadKind::Segformer { embed } => format!("embed {embed}"),
            SegHeadKind::Lraspp { inter } => format!("inter {inter}"),
        };
        println!(
            "{} head ({detail}, {classes} classes): {:.1} MMACs, {:.3} M params",
            kind.name(),
            head_cost.mmacs,
            head_cost.params as f64 / 1e6
        );
        println!(
            "total: {:.1} MMACs ({:.2} GMACs), {:.3} M params  [space {}, input {h}x{w}, arch resolution {}]",
            mmacs,
            mmacs / 1e3,
            params as f64 / 1e6,
            space.name,
            arch.resolution
        );
    }
    Ok(())
}
