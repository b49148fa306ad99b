//! Commands of the contract that are not built yet: they say so and fail, never print fake output.

use clap::Args;

#[derive(Args)]
pub struct AnyArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _rest: Vec<String>,
}

pub fn run(name: &str) -> anyhow::Result<()> {
    anyhow::bail!("`nasvit {name}` is not implemented yet")
}
