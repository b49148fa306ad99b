//! The MLP of a transformer layer (`mlpK.linear1`, `mlpK.linear2`, optional `mlpK.dwconv.weight`):
//! `Linear C -> rC` -> [3x3 depthwise conv on the token grid, no bias] -> swish -> `Linear rC -> C`.
//! The released code has `r = 1` and no depthwise conv; both are options of the paper space.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::Tensor;

use crate::elastic::{detached_param, lead, ConvWeight, ElasticLinear};
use crate::init::ParamInit;

#[derive(Module, Debug)]
pub struct Mlp {
    pub linear1: ElasticLinear,
    pub linear2: ElasticLinear,
    /// `[r_max C, 1, 3, 3]`; present when the space allows a depthwise conv in the MLP.
    pub dwconv: Option<ConvWeight>,
}

impl Mlp {
    pub fn new(c: usize, hidden: usize, dwconv: bool, init: &mut ParamInit) -> Self {
        Self {
            linear1: ElasticLinear::new(hidden, c, init),
            linear2: ElasticLinear::new(c, hidden, init),
            dwconv: dwconv.then(|| ConvWeight::new(hidden, 1, 3, init)),
        }
    }

    /// # Shapes
    /// - `t`: `[B, N, C]` tokens of a `grid.0 x grid.1` map -> `[B, N, C]`
    pub fn forward(&self, t: Tensor<3>, hidden: usize, dwconv: bool, grid: (usize, usize)) -> Tensor<3> {
        let [b, n, c] = t.dims();
        let y = self.linear1.forward(t, hidden);
        let y = match (&self.dwconv, dwconv) {
            (Some(dw), true) => {
                let img = y.swap_dims(1, 2).reshape([b, hidden, grid.0, grid.1]);
                dw.forward_depthwise(img, 3, 1).reshape([b, hidden, n]).swap_dims(1, 2)
            }
            _ => y,
        };
        self.linear2.forward(silu(y), c)
    }

    pub fn sliced(&self, c: usize, hidden: usize, dwconv: bool) -> Self {
        Self {
            linear1: self.linear1.sliced(hidden, c),
            linear2: self.linear2.sliced(c, hidden),
            dwconv: match (&self.dwconv, dwconv) {
                (Some(dw), true) => Some(ConvWeight {
                    weight: detached_param(lead(dw.weight.val(), [hidden, 1, 3, 3])),
                }),
                _ => None,
            },
        }
    }
}
