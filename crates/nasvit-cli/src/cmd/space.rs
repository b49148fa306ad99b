//! `nasvit space show SPACE`.

use anyhow::Context;
use clap::Subcommand;
use nasvit_space::{SearchSpace, BUILTIN};

#[derive(Subcommand)]
pub enum SpaceCommand {
    /// Print the choices of a space, its MACs range and its largest token grid.
    Show {
        /// A built-in space (official, paper, tiny, tiny-cnn) or a YAML/JSON file.
        space: String,
        /// Print the space file (YAML) instead of the table.
        #[arg(long)]
        yaml: bool,
    },
    /// List the built-in spaces.
    List,
}

pub fn run(command: SpaceCommand) -> anyhow::Result<()> {
    match command {
        SpaceCommand::List => {
            for name in BUILTIN {
                let s = SearchSpace::builtin(name)?;
                let (min, max) = (s.cost(&s.min_arch()), s.cost(&s.max_arch()));
                println!("{name:<10} {:>8.1} - {:>8.1} MMACs", min.mmacs, max.mmacs);
            }
        }
        SpaceCommand::Show { space, yaml } => {
            let s = SearchSpace::load(&space).with_context(|| format!("loading space `{space}`"))?;
            if yaml {
                print!("{}", s.to_yaml());
                return Ok(());
            }
            print!("{}", describe(&s));
        }
    }
    Ok(())
}

fn list(v: &[usize]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

fn describe(s: &SearchSpace) -> String {
    let mut out = String::new();
    let (min, max) = (s.cost(&s.min_arch()), s.cost(&s.max_arch()));
    out += &format!(
        "space {}: {} input channels, {} classes\n",
        s.name, s.in_channels, s.num_classes
    );
    out += &format!("resolutions {}\n", list(&s.resolutions));
    out += &format!(
        "{:<11} {:<14} {:<14} {:<8} {:<8} {:>6} {:>3}  {}\n",
        "stage", "width", "depth", "kernel", "expand", "stride", "se", "blocks"
    );
    out += &format!(
        "{:<11} {:<14} {:<14} {:<8} {:<8} {:>6} {:>3}  conv3x3\n",
        "first_conv",
        list(&s.stem.widths),
        "-",
        "3",
        "-",
        s.stem.stride,
        "-"
    );
    for st in &s.stages {
        let blocks = if st.transformer {
            "MBConv + transformer"
        } else {
            "MBConv"
        };
        out += &format!(
            "{:<11} {:<14} {:<14} {:<8} {:<8} {:>6} {:>3}  {blocks}\n",
            st.name,
            list(&st.widths),
            list(&st.depths),
            list(&st.kernels),
            list(&st.expand_ratios),
            st.stride,
            if st.se { "yes" } else { "no" }
        );
    }
    out += &format!("{:<11} {:<14}  v3 head\n", "last_conv", list(&s.head.widths));
    if let Some(p) = &s.paper {
        out += &format!(
            "paper genes: windows {} (first transformer stage), mlp_ratio {}, mlp_dwconv {:?}\n",
            list(&p.windows),
            list(&p.mlp_ratio),
            p.mlp_dwconv
        );
    }
    let grid = match s.max_grid() {
        0 => "no transformer stages (a CNN space)".to_string(),
        g => format!("largest token grid {g}x{g}"),
    };
    out += &format!(
        "{0}; subnets from {1:.1} MMACs / {2:.2} M params (min) to {3:.1} MMACs / {4:.2} M params (max)\n",
        grid,
        min.mmacs,
        min.params as f64 / 1e6,
        max.mmacs,
        max.params as f64 / 1e6
    );
    out
}
