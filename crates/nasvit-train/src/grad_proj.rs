//! Gradient combination between the supernet (max subnet) gradient and the subnets' gradient
//! (NASVIT.md 4.3, DESIGN.md decision 2).
//!
//! One training step produces two gradients per parameter tensor: `g_sup` from the max subnet's loss and
//! `g_sub`, the sum over the smaller subnets of one step (sum them with `burn::optim::GradientsAccumulator`
//! or by one backward of the summed losses). [`combine_gradients`] then
//!
//! 1. scales `g_sub` so that its global L2 norm over all parameters is at most `max_sub_norm` (1.0), with
//!    PyTorch's `clip_grad_norm_` formula `min(1, max / (norm + 1e-6))`; `g_sup` is not clipped;
//! 2. per tensor, with projection on: `g = (1 + c) g_sub + g_sup`, `c = clamp(-<g_sub, g_sup> /
//!    (|g_sub|^2 + 1e-6), 0, 2)`. When the two agree (`<g_sub, g_sup> >= 0`) the clamp makes `c = 0` and
//!    this is the plain sum, so one formula covers both cases and no value has to leave the device;
//! 3. with projection off: `g = g_sub + g_sup` (still after the clip);
//! 4. a tensor that only one side touched gets that side's gradient once (the released code's `2 g_sup`
//!    for a tensor no subnet touched is a PyTorch-version artefact, see NASVIT.md 4.3).
//!
//! [`gradient_cosines`] and [`ConflictTable`] measure how often the two gradients conflict, per tensor and
//! per layer (the paper's gradient-conflict table).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// Added to `|g_sub|^2` in the projection coefficient, as released.
const PROJ_EPS: f64 = 1e-6;
/// Added to the global norm in the clip coefficient, as in PyTorch's `clip_grad_norm_`.
const CLIP_EPS: f64 = 1e-6;

/// How to combine the two gradients.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CombineOptions {
    /// Project away the supernet gradient's component that opposes the subnet gradient; `false` is the
    /// plain sum (the released code before epoch 101, and the ablation).
    pub project: bool,
    /// Global L2 norm the subnet gradient is clipped to; `None` disables the clip.
    pub max_sub_norm: Option<f64>,
    /// Upper bound of the projection coefficient `c`.
    pub max_coef: f64,
}

impl Default for CombineOptions {
    fn default() -> Self {
        Self {
            project: true,
            max_sub_norm: Some(1.0),
            max_coef: 2.0,
        }
    }
}

/// What [`combine_gradients`] measured. The tensors stay on the device; read them only when logging.
#[derive(Debug, Clone)]
pub struct CombineStats {
    /// `[1]`: global L2 norm of the subnet gradient before the clip; `None` without any subnet gradient.
    pub sub_norm: Option<Tensor<1>>,
    /// `[1]`: the scale applied to the subnet gradient (1 within the bound); `None` when nothing was clipped.
    pub sub_scale: Option<Tensor<1>>,
    /// `[1]`: number of tensors where `<g_sub, g_sup> < 0` (counted whether or not projection is on).
    pub conflicts: Option<Tensor<1>>,
    /// Tensors that had both gradients.
    pub tensors_both: usize,
    /// Tensors that had only the supernet gradient.
    pub tensors_sup_only: usize,
    /// Tensors that had only a subnet gradient.
    pub tensors_sub_only: usize,
}

/// One float parameter of a module: its id, dotted path (e.g. `blocks.3.fc1.weight`) and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    pub id: ParamId,
    pub path: String,
    pub shape: Vec<usize>,
}

/// The float parameters of `module`, in visiting order.
pub fn float_params<M: Module>(module: &M) -> Vec<ParamInfo> {
    #[derive(Default)]
    struct Collect {
        path: Vec<String>,
        out: Vec<ParamInfo>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            // the block enum's variant (`MbConv`, `Transformer`) is not a level of the checkpoint's keys
            let variant = container_type.starts_with("Enum") || name == "MbConv" || name == "Transformer";
            self.path.push(if variant { String::new() } else { name.to_string() });
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.push(ParamInfo {
                id: param.id,
                path: self.path.join("."),
                shape: param.lazy_shape().to_vec(),
            });
        }
    }
    let mut visitor = Collect::default();
    module.visit(&mut visitor);
    visitor.out
}

/// Global L2 norm `[1]` over all of `module`'s gradients in `grads` (zero when there are none).
pub fn global_norm<M: Module>(module: &M, grads: &GradientsParams) -> Option<Tensor<1>> {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut visitor = SumSquares { grads, total: None };
    module.visit(&mut visitor);
    visitor.total.map(|t| t.sqrt())
}

/// `factor * g` for every gradient of `module`'s float parameters in `grads` (others are dropped).
pub fn scale_gradients<M: Module>(module: &M, grads: GradientsParams, factor: f64) -> GradientsParams {
    struct Scale {
        grads: GradientsParams,
        factor: f64,
        out: GradientsParams,
    }
    impl ModuleVisitor for Scale {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.out.register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut visitor = Scale {
        grads,
        factor,
        out: GradientsParams::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// Combines the supernet gradient `g_sup` and the summed subnet gradient `g_sub` of `module` into the
/// gradient the optimizer steps with (see the module docs). Gradients of ids that are not float
/// parameters of `module` are dropped.
pub fn combine_gradients<M: Module>(
    module: &M,
    g_sup: GradientsParams,
    g_sub: GradientsParams,
    options: &CombineOptions,
) -> (GradientsParams, CombineStats) {
    let sub_norm = global_norm(module, &g_sub);
    let sub_scale = match (&sub_norm, options.max_sub_norm) {
        (Some(norm), Some(max)) => Some(norm.clone().add_scalar(CLIP_EPS).recip().mul_scalar(max).clamp_max(1.0)),
        _ => None,
    };
    let mut visitor = Combine {
        g_sup,
        g_sub,
        sub_scale: sub_scale.clone(),
        options,
        out: GradientsParams::new(),
        conflicts: None,
        both: 0,
        sup_only: 0,
        sub_only: 0,
    };
    module.visit(&mut visitor);
    let stats = CombineStats {
        sub_norm,
        sub_scale,
        conflicts: visitor.conflicts,
        tensors_both: visitor.both,
        tensors_sup_only: visitor.sup_only,
        tensors_sub_only: visitor.sub_only,
    };
    (visitor.out, stats)
}

struct Combine<'a> {
    g_sup: GradientsParams,
    g_sub: GradientsParams,
    sub_scale: Option<Tensor<1>>,
    options: &'a CombineOptions,
    out: GradientsParams,
    conflicts: Option<Tensor<1>>,
    both: usize,
    sup_only: usize,
    sub_only: usize,
}

impl ModuleVisitor for Combine<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let sup = self.g_sup.remove::<D>(param.id);
        let sub = self.g_sub.remove::<D>(param.id).map(|g| match &self.sub_scale {
            Some(scale) => g * scale.clone().reshape([1; D]),
            None => g,
        });
        let combined = match (sub, sup) {
            (Some(gb), Some(gs)) => {
                self.both += 1;
                let dot = (gb.clone() * gs.clone()).sum();
                let conflict = dot.clone().lower_elem(0.0).float();
                self.conflicts = Some(match self.conflicts.take() {
                    Some(c) => c + conflict,
                    None => conflict,
                });
                if self.options.project {
                    let norm2 = gb.clone().square().sum().add_scalar(PROJ_EPS);
                    let c = (dot.neg() / norm2).clamp(0.0, self.options.max_coef);
                    gb * c.add_scalar(1.0).reshape([1; D]) + gs
                } else {
                    gb + gs
                }
            }
            (Some(gb), None) => {
                self.sub_only += 1;
                gb
            }
            (None, Some(gs)) => {
                self.sup_only += 1;
                gs
            }
            (None, None) => return,
        };
        self.out.register::<D>(param.id, combined);
    }
}

/// Cosine between the supernet and subnet gradients of one parameter tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorCosine {
    /// Dotted module path of the tensor.
    pub path: String,
    /// Number of elements.
    pub numel: usize,
    /// `<g_sup, g_sub> / (|g_sup| |g_sub|)`; 0 when either gradient is zero.
    pub cosine: f64,
}

/// Per-tensor cosine between `g_sup` and `g_sub` for every float parameter of `module` that has both.
/// Reads the values back from the device (one small read per tensor): meant for analysis, not every step.
/// Tensors whose gradient is zero in exact arithmetic, left out of conflict statistics: a key bias adds `q . b` to
/// every logit of a query's row, and the talking-head pre-softmax mix's bias adds one constant per head and row;
/// the softmax cancels both, so their computed gradients are rounding noise whose cosines have a random sign.
pub fn zero_by_symmetry(path: &str) -> bool {
    path.ends_with("attn.k.linear.bias") || path.ends_with("attn.proj_l.linear.bias")
}

pub fn gradient_cosines<M: Module>(module: &M, g_sup: &GradientsParams, g_sub: &GradientsParams) -> Vec<TensorCosine> {
    struct Cosines<'a> {
        g_sup: &'a GradientsParams,
        g_sub: &'a GradientsParams,
        path: Vec<String>,
        out: Vec<TensorCosine>,
    }
    impl ModuleVisitor for Cosines<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            // the block enum's variant (`MbConv`, `Transformer`) is not a level of the checkpoint's keys
            let variant = container_type.starts_with("Enum") || name == "MbConv" || name == "Transformer";
            self.path.push(if variant { String::new() } else { name.to_string() });
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let (Some(gs), Some(gb)) = (self.g_sup.get::<D>(param.id), self.g_sub.get::<D>(param.id)) else {
                return;
            };
            let path: Vec<&str> = self.path.iter().map(String::as_str).filter(|p| !p.is_empty()).collect();
            let path = path.join(".");
            if zero_by_symmetry(&path) {
                return;
            }
            let numel = gs.shape().num_elements();
            let parts = Tensor::cat(
                vec![(gs.clone() * gb.clone()).sum(), gs.square().sum(), gb.square().sum()],
                0,
            );
            let v = parts
                .into_data()
                .convert::<f64>()
                .try_into_vec::<f64>()
                .unwrap_or_else(|_| vec![0.0; 3]);
            let (dot, ns, nb) = (v[0], v[1].sqrt(), v[2].sqrt());
            let cosine = if ns > 0.0 && nb > 0.0 { dot / (ns * nb) } else { 0.0 };
            self.out.push(TensorCosine { path, numel, cosine });
        }
    }
    let mut visitor = Cosines {
        g_sup,
        g_sub,
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// Counts of negative cosines over many batches, per tensor path: the gradient-conflict table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConflictTable {
    /// path -> (negative count, total count).
    pub counts: BTreeMap<String, (u64, u64)>,
}

/// One row of a [`ConflictTable`] summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRow {
    pub name: String,
    /// Share of (tensor, batch) pairs with a negative cosine.
    pub negative_share: f64,
    /// Number of (tensor, batch) pairs.
    pub count: u64,
}

impl ConflictTable {
    /// Adds the cosines of one batch.
    pub fn add(&mut self, cosines: &[TensorCosine]) {
        for c in cosines {
            let entry = self.counts.entry(c.path.clone()).or_insert((0, 0));
            entry.0 += u64::from(c.cosine < 0.0);
            entry.1 += 1;
        }
    }

    /// One row per tensor path.
    pub fn by_tensor(&self) -> Vec<ConflictRow> {
        self.group(|p| p.to_string())
    }

    /// One row per layer: tensors grouped by their path without its last component
    /// (`blocks.3.fc1.weight` and `blocks.3.fc1.bias` form `blocks.3.fc1`), or by the first `depth`
    /// components when `depth` is given (`Some(2)`: `blocks.3`).
    pub fn by_layer(&self, depth: Option<usize>) -> Vec<ConflictRow> {
        self.group(|p| {
            let parts: Vec<&str> = p.split('.').collect();
            let keep = match depth {
                Some(d) => d.min(parts.len()),
                None => parts.len().saturating_sub(1).max(1),
            };
            parts[..keep].join(".")
        })
    }

    fn group(&self, key: impl Fn(&str) -> String) -> Vec<ConflictRow> {
        let mut groups: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (path, (neg, total)) in &self.counts {
            let entry = groups.entry(key(path)).or_insert((0, 0));
            entry.0 += neg;
            entry.1 += total;
        }
        groups
            .into_iter()
            .map(|(name, (neg, total))| ConflictRow {
                name,
                negative_share: if total == 0 { 0.0 } else { neg as f64 / total as f64 },
                count: total,
            })
            .collect()
    }
}
