//! ONNX export of a static subnet: an `ExportedModel` -> an ONNX `ModelProto` (opset 17, IR version 8).
//!
//! The bytes come from a small hand-written protobuf encoder (no `protoc`, no ONNX crate): varints and
//! length-delimited fields of `ModelProto`, `GraphProto`, `NodeProto`, `AttributeProto`, `TensorProto` (f32 and
//! int64 as `raw_data`) and `ValueInfoProto`. [`inspect`] decodes the same subset back, for checks.
//!
//! # Graph
//!
//! - Input `input`: `[1, C, R, R]` f32 at the arch's resolution `R` (or `[batch, C, R, R]` with
//!   [`OnnxOptions::dynamic_batch`]), already normalised. **The graph does no resize**: the engine bicubically
//!   resizes other sizes to `R` (as the released network does); callers of the ONNX model must do that first
//!   (`crate::resize::bicubic`). Output `logits`: `[1, classes]`.
//! - It computes the engine's function (NASVIT.md 2.1-2.2) on NCHW maps throughout: the token linears of the
//!   transformer layers are 1x1 convs (the same arithmetic as `[N, C]` MatMuls, without layout changes), swish is
//!   `x * Sigmoid(x)`, the joint LayerNorm is `ReduceMean` over `[C, H, W]`, `Sub`, variance by `Mul` +
//!   `ReduceMean`, `+ 1e-5`, `Sqrt`, `Div`, then per-channel `Mul` / `Add`. Heads are split with `Reshape` +
//!   `Transpose`, the dense relative position bias `attn.rpb` is an initializer, talking heads are `MatMul` with the
//!   `[h, h]` mixing matrix over the head axis plus a bias, before `Softmax(axis=-1)` and after it.
//! - As in the engine, three constants are folded into weights: `8^-0.5` into the q rows, `scale_attn` into the
//!   rows of `attn.proj`, `scale_mlp` into the rows of both `fc2`.
//! - The MBConv shortcut: identity, or `AveragePool` (kernel = stride = s, pads 1 on every side when the input side
//!   is odd, `count_include_pad=1`) when strided, then a 1x1 conv without bias when the width changes.
//! - Paper genes are supported: 2x2 attention windows (the window split is part of the head split), MLP ratio, and
//!   the 3x3 depthwise conv between fc1 and the swish.
//! - `metadata_props`: `nasvit.arch`, `nasvit.preprocess`, `nasvit.labels` (JSON).

use std::path::Path;

use nasvit_space::{BlockShape, SubnetShape, HEAD_DIM, V_EXPAND};

use crate::error::{InferError, Result};
use crate::export::ExportedModel;

/// ONNX operator set of the exported graphs.
pub const OPSET: i64 = 17;
/// ONNX IR version of the exported files.
pub const IR_VERSION: i64 = 8;
/// Graph input and output names.
pub const INPUT_NAME: &str = "input";
pub const OUTPUT_NAME: &str = "logits";

/// Export options.
#[derive(Clone, Copy, Debug, Default)]
pub struct OnnxOptions {
    /// A symbolic batch dimension `batch` instead of 1.
    pub dynamic_batch: bool,
}

// ---------------------------------------------------------------------------------------------------------------
// Protobuf encoding

const WT_VARINT: u64 = 0;
const WT_I64: u64 = 1;
const WT_LEN: u64 = 2;
const WT_I32: u64 = 5;

#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wt: u64) {
        self.varint((u64::from(field) << 3) | wt);
    }
    /// int32 / int64 / enum (negative values as 10-byte two's complement, as protobuf does).
    fn int(&mut self, field: u32, v: i64) {
        self.key(field, WT_VARINT);
        self.varint(v as u64);
    }
    fn float(&mut self, field: u32, v: f32) {
        self.key(field, WT_I32);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, WT_LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }
    fn msg(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }
}

// TensorProto.DataType
const FLOAT: i64 = 1;
const INT64: i64 = 7;
// AttributeProto.AttributeType
const ATTR_FLOAT: i64 = 1;
const ATTR_INT: i64 = 2;
const ATTR_STRING: i64 = 3;
const ATTR_INTS: i64 = 7;

#[derive(Clone, Debug)]
enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(&'static str),
}

struct Node {
    op: &'static str,
    name: String,
    inputs: Vec<String>,
    output: String,
    attrs: Vec<(&'static str, Attr)>,
}

enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

struct Init {
    name: String,
    dims: Vec<i64>,
    data: Data,
}

/// Graph under construction; value names are unique, nodes are appended in topological order.
#[derive(Default)]
struct Builder {
    nodes: Vec<Node>,
    inits: Vec<Init>,
    count: usize,
}

fn dims_i64(d: &[usize]) -> Vec<i64> {
    d.iter().map(|&x| x as i64).collect()
}

impl Builder {
    fn f32(&mut self, name: &str, dims: &[usize], data: Vec<f32>) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len(), "{name}");
        self.inits.push(Init {
            name: name.to_string(),
            dims: dims_i64(dims),
            data: Data::F32(data),
        });
        name.to_string()
    }

    /// An int64 vector constant (Reshape shapes), named after its values.
    fn shape(&mut self, v: &[i64]) -> String {
        let name = format!(
            "shape_{}",
            v.iter()
                .map(|x| if *x < 0 { format!("m{}", -x) } else { x.to_string() })
                .collect::<Vec<_>>()
                .join("_")
        );
        if !self.inits.iter().any(|i| i.name == name) {
            self.inits.push(Init {
                name: name.clone(),
                dims: vec![v.len() as i64],
                data: Data::I64(v.to_vec()),
            });
        }
        name
    }

    /// An int64 initializer (once per name).
    fn i64s(&mut self, name: &str, dims: &[usize], data: impl FnOnce() -> Vec<i64>) -> String {
        if !self.inits.iter().any(|i| i.name == name) {
            self.inits.push(Init {
                name: name.to_string(),
                dims: dims_i64(dims),
                data: Data::I64(data()),
            });
        }
        name.to_string()
    }

    fn scalar(&mut self, name: &str, v: f32) -> String {
        if !self.inits.iter().any(|i| i.name == name) {
            self.f32(name, &[], vec![v]);
        }
        name.to_string()
    }

    fn node(&mut self, op: &'static str, inputs: &[&str], attrs: Vec<(&'static str, Attr)>) -> String {
        self.count += 1;
        let output = format!("{}_{}", op.to_lowercase(), self.count);
        self.nodes.push(Node {
            op,
            name: format!("n{}_{op}", self.count),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            output: output.clone(),
            attrs,
        });
        output
    }

    fn swish(&mut self, x: &str) -> String {
        let s = self.node("Sigmoid", &[x], vec![]);
        self.node("Mul", &[x, &s], vec![])
    }

    fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.shape(shape);
        self.node("Reshape", &[x, &s], vec![])
    }

    fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.node("Transpose", &[x], vec![("perm", Attr::Ints(perm.to_vec()))])
    }

    /// Conv with padding `k / 2` on every side; `w` and `b` are initializer names.
    fn conv(&mut self, x: &str, w: &str, b: Option<&str>, k: usize, stride: usize, group: usize) -> String {
        let p = (k / 2) as i64;
        let mut ins = vec![x, w];
        if let Some(b) = b {
            ins.push(b);
        }
        self.node(
            "Conv",
            &ins,
            vec![
                ("kernel_shape", Attr::Ints(vec![k as i64, k as i64])),
                ("strides", Attr::Ints(vec![stride as i64, stride as i64])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
                ("group", Attr::Int(group as i64)),
            ],
        )
    }

    /// Renames the output of the last node (the graph output).
    fn name_last_output(&mut self, name: &str) {
        if let Some(n) = self.nodes.last_mut() {
            n.output = name.to_string();
        }
    }

    fn encode(self, io: GraphIo) -> Vec<u8> {
        let mut g = Pb::default();
        for n in self.nodes {
            let mut m = Pb::default();
            for i in &n.inputs {
                m.str(1, i);
            }
            m.str(2, &n.output);
            m.str(3, &n.name);
            m.str(4, n.op);
            for (name, a) in n.attrs {
                let mut am = Pb::default();
                am.str(1, name);
                match a {
                    Attr::Float(f) => {
                        am.float(2, f);
                        am.int(20, ATTR_FLOAT);
                    }
                    Attr::Int(i) => {
                        am.int(3, i);
                        am.int(20, ATTR_INT);
                    }
                    Attr::Ints(v) => {
                        for i in v {
                            am.int(8, i);
                        }
                        am.int(20, ATTR_INTS);
                    }
                    Attr::Str(v) => {
                        am.str(4, v);
                        am.int(20, ATTR_STRING);
                    }
                }
                m.msg(5, am);
            }
            g.msg(1, m);
        }
        g.str(2, "nasvit");
        for init in self.inits {
            let mut t = Pb::default();
            for d in &init.dims {
                t.int(1, *d);
            }
            let raw: Vec<u8> = match &init.data {
                Data::F32(v) => {
                    t.int(2, FLOAT);
                    v.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
                Data::I64(v) => {
                    t.int(2, INT64);
                    v.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
            };
            t.str(8, &init.name);
            t.bytes(9, &raw);
            g.msg(5, t);
        }
        g.msg(11, value_info(INPUT_NAME, &io.input));
        g.msg(12, value_info(OUTPUT_NAME, &io.output));

        let mut mp = Pb::default();
        mp.int(1, IR_VERSION);
        mp.str(2, "nasvit-infer");
        mp.str(3, env!("CARGO_PKG_VERSION"));
        mp.str(6, io.doc);
        mp.msg(7, g);
        let mut op = Pb::default();
        op.str(1, "");
        op.int(2, OPSET);
        mp.msg(8, op);
        for (k, v) in io.meta {
            let mut e = Pb::default();
            e.str(1, k);
            e.str(2, &v);
            mp.msg(14, e);
        }
        mp.0
    }
}

/// What a graph reads and writes, and its descriptions.
struct GraphIo {
    input: Vec<Option<usize>>,
    output: Vec<Option<usize>>,
    doc: &'static str,
    meta: Vec<(&'static str, String)>,
}

/// `ValueInfoProto` of an f32 tensor; `None` dims are the symbolic `batch`.
fn value_info(name: &str, dims: &[Option<usize>]) -> Pb {
    let mut shape = Pb::default();
    for d in dims {
        let mut dm = Pb::default();
        match d {
            Some(v) => dm.int(1, *v as i64),
            None => dm.str(2, "batch"),
        }
        shape.msg(1, dm);
    }
    let mut tt = Pb::default();
    tt.int(1, FLOAT);
    tt.msg(2, shape);
    let mut tp = Pb::default();
    tp.msg(1, tt);
    let mut vi = Pb::default();
    vi.str(1, name);
    vi.msg(2, tp);
    vi
}

// ---------------------------------------------------------------------------------------------------------------
// The network

struct Ctx<'a> {
    tensors: &'a crate::state::StateDict,
    b: Builder,
}

/// Where a transformer layer's relative position bias comes from.
#[derive(Clone, Copy)]
enum Rpb {
    /// `attn.rpb` `[h, T, T]` (classification exports).
    Dense,
    /// `attn.rpb_table` `[(2g - 1)^2, h]` gathered by the clipped index of the grid (segmentation exports).
    Released { g: usize },
}

/// Row of the released table per (query, key) of an `h x w` grid, offsets clipped to the table's reach
/// (`kernels::rpb_table_clipped`'s rule).
fn clipped_index(h: usize, w: usize, g: usize) -> Vec<i64> {
    let gi = g as i64;
    let side = 2 * gi - 1;
    let reach = |d: i64| d.clamp(-(gi - 1), gi - 1) + gi - 1;
    let n = h * w;
    let mut idx = Vec::with_capacity(n * n);
    for q in 0..n {
        let (qy, qx) = ((q / w) as i64, (q % w) as i64);
        for k in 0..n {
            let (ky, kx) = ((k / w) as i64, (k % w) as i64);
            idx.push(reach(qy - ky) * side + reach(qx - kx));
        }
    }
    idx
}

impl Ctx<'_> {
    fn tensor(&self, key: &str) -> Result<&crate::state::Tensor> {
        self.tensors.get(key).ok_or_else(|| InferError::MissingKey {
            key: key.into(),
            context: String::new(),
        })
    }

    /// The tensor `key` as an initializer of the same name and shape.
    fn init(&mut self, key: &str) -> Result<String> {
        let t = self.tensor(key)?.clone();
        Ok(self.b.f32(key, &t.shape, t.data))
    }

    /// The tensor `key` as an initializer with other dims (same element count).
    fn init_as(&mut self, key: &str, dims: &[usize]) -> Result<String> {
        let t = self.tensor(key)?.clone();
        Ok(self.b.f32(key, dims, t.data))
    }

    /// A linear `[out, in]` (or 1x1 conv) as 1x1 conv weights `[out, in, 1, 1]`, rows times `scale`, and its bias.
    fn linear_1x1(&mut self, prefix: &str, scale: Option<&[f32]>, bias: bool) -> Result<(String, Option<String>)> {
        let w = self.tensor(&format!("{prefix}.weight"))?;
        let (o, i) = (w.shape[0], w.numel() / w.shape[0].max(1));
        let mut wd = w.data.clone();
        let mut bd = if bias {
            Some(self.tensor(&format!("{prefix}.bias"))?.data.clone())
        } else {
            None
        };
        if let Some(s) = scale {
            for (r, &g) in s.iter().enumerate() {
                wd[r * i..(r + 1) * i].iter_mut().for_each(|v| *v *= g);
                if let Some(b) = &mut bd {
                    b[r] *= g;
                }
            }
        }
        let wn = self.b.f32(&format!("{prefix}.weight"), &[o, i, 1, 1], wd);
        let bn = bd.map(|b| self.b.f32(&format!("{prefix}.bias"), &[o], b));
        Ok((wn, bn))
    }

    /// `x -> conv1x1(x)`, from a linear / 1x1 conv prefix.
    fn conv1x1(&mut self, x: &str, prefix: &str, scale: Option<&[f32]>, bias: bool) -> Result<String> {
        let (w, b) = self.linear_1x1(prefix, scale, bias)?;
        Ok(self.b.conv(x, &w, b.as_deref(), 1, 1, 1))
    }

    /// Joint LayerNorm over `[C, H, W]` of each sample, then the per-channel affine of `prefix`.
    fn joint_ln(&mut self, x: &str, prefix: &str, c: usize) -> Result<String> {
        let axes = || vec![("axes", Attr::Ints(vec![1, 2, 3])), ("keepdims", Attr::Int(1))];
        let mean = self.b.node("ReduceMean", &[x], axes());
        let d = self.b.node("Sub", &[x, &mean], vec![]);
        let sq = self.b.node("Mul", &[&d, &d], vec![]);
        let var = self.b.node("ReduceMean", &[&sq], axes());
        let eps = self.b.scalar("ln_eps", 1e-5);
        let ve = self.b.node("Add", &[&var, &eps], vec![]);
        let sd = self.b.node("Sqrt", &[&ve], vec![]);
        let n = self.b.node("Div", &[&d, &sd], vec![]);
        let gm = self.init_as(&format!("{prefix}.weight"), &[c, 1, 1])?;
        let bt = self.init_as(&format!("{prefix}.bias"), &[c, 1, 1])?;
        let y = self.b.node("Mul", &[&n, &gm], vec![]);
        Ok(self.b.node("Add", &[&y, &bt], vec![]))
    }

    #[allow(clippy::too_many_arguments)]
    fn mbconv(
        &mut self,
        x: &str,
        p: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        (hin, win): (usize, usize),
        no_expand: bool,
        se: bool,
    ) -> Result<String> {
        let mut h = x.to_string();
        if !no_expand {
            let e = self.conv1x1(&h, &format!("{p}.expand"), None, true)?;
            h = self.b.swish(&e);
        }
        let dw_w = self.init(&format!("{p}.dw.weight"))?;
        let dw_b = self.init(&format!("{p}.dw.bias"))?;
        let cmid = self.tensor(&format!("{p}.dw.weight"))?.shape[0];
        let d = self.b.conv(&h, &dw_w, Some(&dw_b), kernel, stride, cmid);
        let mut d = self.b.swish(&d);
        if se {
            let m = self.b.node("GlobalAveragePool", &[&d], vec![]);
            let r = self.conv1x1(&m, &format!("{p}.se.reduce"), None, true)?;
            let r = self.b.node("Relu", &[&r], vec![]);
            let s = self.conv1x1(&r, &format!("{p}.se.expand"), None, true)?;
            let s = self.b.node(
                "HardSigmoid",
                &[&s],
                vec![("alpha", Attr::Float(1.0 / 6.0)), ("beta", Attr::Float(0.5))],
            );
            d = self.b.node("Mul", &[&d, &s], vec![]);
        }
        let out = self.conv1x1(&d, &format!("{p}.project"), None, true)?;
        let mut sc = x.to_string();
        if stride > 1 {
            let (ph, pw) = ((hin % 2) as i64, (win % 2) as i64);
            sc = self.b.node(
                "AveragePool",
                &[&sc],
                vec![
                    ("kernel_shape", Attr::Ints(vec![stride as i64; 2])),
                    ("strides", Attr::Ints(vec![stride as i64; 2])),
                    ("pads", Attr::Ints(vec![ph, pw, ph, pw])),
                    ("count_include_pad", Attr::Int(1)),
                ],
            );
        }
        if cin != cout {
            sc = self.conv1x1(&sc, &format!("{p}.shortcut"), None, false)?;
        }
        Ok(self.b.node("Add", &[&out, &sc], vec![]))
    }

    /// Splits `x: [B, heads*d, GH, GW]` into `[B*W, heads, T, d]` (or `[B*W, heads, d, T]` with `d_first`), `W`
    /// windows of `ws x ws` per map, `T = (GH/ws)(GW/ws)` tokens each, in row-major token order.
    fn split_heads(
        &mut self,
        x: &str,
        heads: usize,
        d: usize,
        (gh, gw): (usize, usize),
        ws: usize,
        d_first: bool,
    ) -> String {
        let (sy, sx) = ((gh / ws) as i64, (gw / ws) as i64);
        let (h, d, ws) = (heads as i64, d as i64, ws as i64);
        if ws == 1 {
            // Global attention: a 4-d reshape, and no transpose at all for k.
            let r = self.b.reshape(x, &[-1, h, d, sy * sx]);
            return if d_first {
                r
            } else {
                self.b.transpose(&r, &[0, 1, 3, 2])
            };
        }
        let r = self.b.reshape(x, &[-1, h, d, ws, sy, ws, sx]);
        // dims: 0 B, 1 h, 2 d, 3 wy, 4 sy, 5 wx, 6 sx
        if d_first {
            let t = self.b.transpose(&r, &[0, 3, 5, 1, 2, 4, 6]);
            self.b.reshape(&t, &[-1, h, d, sy * sx])
        } else {
            let t = self.b.transpose(&r, &[0, 3, 5, 1, 4, 6, 2]);
            self.b.reshape(&t, &[-1, h, sy * sx, d])
        }
    }

    /// `Wm @ a + b` over the head axis of `a: [B*W, h, T, T]`.
    fn head_mix(&mut self, a: &str, prefix: &str, h: usize, t: usize) -> Result<String> {
        let w = self.init(&format!("{prefix}.weight"))?;
        let b = self.init_as(&format!("{prefix}.bias"), &[h, 1])?;
        let (hi, ti) = (h as i64, t as i64);
        let r = self.b.reshape(a, &[-1, hi, ti * ti]);
        let m = self.b.node("MatMul", &[&w, &r], vec![]);
        let m = self.b.node("Add", &[&m, &b], vec![]);
        Ok(self.b.reshape(&m, &[-1, hi, ti, ti]))
    }

    fn mlp(&mut self, x: &str, p: &str, gm: &[f32], dwconv: bool) -> Result<String> {
        let f = self.conv1x1(x, &format!("{p}.fc1"), None, true)?;
        let f = if dwconv {
            let w = self.init(&format!("{p}.dw.weight"))?;
            let hidden = self.tensor(&format!("{p}.dw.weight"))?.shape[0];
            self.b.conv(&f, &w, None, 3, 1, hidden)
        } else {
            f
        };
        let a = self.b.swish(&f);
        self.conv1x1(&a, &format!("{p}.fc2"), Some(gm), true)
    }

    #[allow(clippy::too_many_arguments)]
    fn transformer(
        &mut self,
        x: &str,
        p: &str,
        c: usize,
        heads: usize,
        (gh, gw): (usize, usize),
        windows: usize,
        mlp_dwconv: bool,
        rpb: Rpb,
    ) -> Result<String> {
        let ws = match windows {
            1 => 1,
            4 if gh.is_multiple_of(2) && gw.is_multiple_of(2) => 2,
            _ => {
                return Err(InferError::Arch(format!(
                    "ONNX export: {windows} attention windows on a {gh}x{gw} grid are not supported"
                )))
            }
        };
        let (sy, sx) = (gh / ws, gw / ws);
        let t = sy * sx;
        let dv = V_EXPAND * HEAD_DIM;
        let u = self.joint_ln(x, &format!("{p}.norm1"), c)?;
        let qs = vec![(HEAD_DIM as f32).powf(-0.5); c];
        let q = self.conv1x1(&u, &format!("{p}.attn.q"), Some(&qs), true)?;
        let k = self.conv1x1(&u, &format!("{p}.attn.k"), None, true)?;
        let v = self.conv1x1(&u, &format!("{p}.attn.v"), None, true)?;
        let vw = self.init(&format!("{p}.attn.vconv.weight"))?;
        let v = self.b.conv(&v, &vw, None, 3, 1, V_EXPAND * c);
        let qh = self.split_heads(&q, heads, HEAD_DIM, (gh, gw), ws, false);
        let kh = self.split_heads(&k, heads, HEAD_DIM, (gh, gw), ws, true);
        let vh = self.split_heads(&v, heads, dv, (gh, gw), ws, false);
        let a = self.b.node("MatMul", &[&qh, &kh], vec![]);
        let rpb = match rpb {
            Rpb::Dense => self.init(&format!("{p}.attn.rpb"))?,
            Rpb::Released { g } => {
                // bias[h, q, k] = table[index[q, k], h]: the index of this window grid is shared by every layer
                // on it (ORT folds the Gather of two constants at load)
                let idx = self
                    .b
                    .i64s(&format!("rpb_index_{sy}x{sx}"), &[t * t], || clipped_index(sy, sx, g));
                let table = self.init(&format!("{p}.attn.rpb_table"))?;
                let gathered = self.b.node("Gather", &[&table, &idx], vec![("axis", Attr::Int(0))]);
                let tr = self.b.transpose(&gathered, &[1, 0]);
                self.b.reshape(&tr, &[1, heads as i64, t as i64, t as i64])
            }
        };
        let a = self.b.node("Add", &[&a, &rpb], vec![]);
        let a = self.head_mix(&a, &format!("{p}.attn.proj_l"), heads, t)?;
        let a = self.b.node("Softmax", &[&a], vec![("axis", Attr::Int(-1))]);
        let a = self.head_mix(&a, &format!("{p}.attn.proj_w"), heads, t)?;
        let o = self.b.node("MatMul", &[&a, &vh], vec![]);
        let (syi, sxi, wsi, hi, dvi) = (sy as i64, sx as i64, ws as i64, heads as i64, dv as i64);
        let (c4, ghi, gwi) = ((V_EXPAND * c) as i64, gh as i64, gw as i64);
        let o = if ws == 1 {
            // [B, h, T, dv] -> [B, h, dv, T] -> [B, 4C, GH, GW]
            let o = self.b.transpose(&o, &[0, 1, 3, 2]);
            self.b.reshape(&o, &[-1, c4, ghi, gwi])
        } else {
            // [B*W, h, T, dv] -> [B, wy, wx, h, sy, sx, dv] -> [B, h, dv, wy, sy, wx, sx] -> [B, 4C, GH, GW]
            let o = self.b.reshape(&o, &[-1, wsi, wsi, hi, syi, sxi, dvi]);
            let o = self.b.transpose(&o, &[0, 3, 6, 1, 4, 2, 5]);
            self.b.reshape(&o, &[-1, c4, ghi, gwi])
        };
        let o = self.b.swish(&o);
        let ga = self.tensor(&format!("{p}.scale_attn"))?.data.clone();
        let o = self.conv1x1(&o, &format!("{p}.attn.proj"), Some(&ga), true)?;
        let mut cur = self.b.node("Add", &[x, &o], vec![]);
        let gm = self.tensor(&format!("{p}.scale_mlp"))?.data.clone();
        // MLP2 (norm3) first, then MLP1 (norm2), as the released layer does.
        for (norm, mlp) in [("norm3", "mlp2"), ("norm2", "mlp1")] {
            let u = self.joint_ln(&cur, &format!("{p}.{norm}"), c)?;
            let m = self.mlp(&u, &format!("{p}.{mlp}"), &gm, mlp_dwconv)?;
            cur = self.b.node("Add", &[&cur, &m], vec![]);
        }
        Ok(cur)
    }
}

/// The ONNX model (batch 1) of an exported subnet; see the module docs for the graph.
pub fn to_onnx(model: &ExportedModel) -> Result<Vec<u8>> {
    to_onnx_with(model, OnnxOptions::default())
}

/// [`to_onnx`] with options.
pub fn to_onnx_with(model: &ExportedModel, opts: OnnxOptions) -> Result<Vec<u8>> {
    model.check()?;
    let sh = SubnetShape::new(&model.space, &model.arch);
    let mut cx = Ctx {
        tensors: &model.tensors,
        b: Builder::default(),
    };
    let w = cx.init("stem.weight")?;
    let b = cx.init("stem.bias")?;
    let x = cx.b.conv(INPUT_NAME, &w, Some(&b), 3, sh.stem_stride, 1);
    let mut cur = cx.b.swish(&x);
    for (i, st) in sh.stages.iter().enumerate() {
        for (j, blk) in st.blocks.iter().enumerate() {
            let p = format!("stages.{i}.{j}");
            cur = match *blk {
                BlockShape::MbConv {
                    cin,
                    cout,
                    kernel,
                    stride,
                    no_expand,
                    se_mid,
                    hin,
                    ..
                } => cx.mbconv(
                    &cur,
                    &p,
                    cin,
                    cout,
                    kernel,
                    stride,
                    (hin, hin),
                    no_expand,
                    se_mid.is_some(),
                )?,
                BlockShape::Transformer {
                    c,
                    heads,
                    grid,
                    windows,
                    mlp_dwconv,
                    ..
                } => cx.transformer(&cur, &p, c, heads, (grid, grid), windows, mlp_dwconv, Rpb::Dense)?,
            };
        }
    }
    let e = cx.conv1x1(&cur, "head.expand", None, true)?;
    let e = cx.b.swish(&e);
    let pooled = cx.b.node("GlobalAveragePool", &[&e], vec![]);
    let m = cx.conv1x1(&pooled, "head.mix", None, false)?;
    let m = cx.b.swish(&m);
    let f = cx.b.node("Flatten", &[&m], vec![("axis", Attr::Int(1))]);
    let cw = cx.init("classifier.weight")?;
    let cb = cx.init("classifier.bias")?;
    cx.b.node(
        "Gemm",
        &[&f, &cw, &cb],
        vec![
            ("transB", Attr::Int(1)),
            ("alpha", Attr::Float(1.0)),
            ("beta", Attr::Float(1.0)),
        ],
    );
    cx.b.name_last_output(OUTPUT_NAME);
    let batch = if opts.dynamic_batch { None } else { Some(1) };
    let r = sh.resolution;
    Ok(cx.b.encode(GraphIo {
        input: vec![batch, Some(sh.in_channels), Some(r), Some(r)],
        output: vec![batch, Some(sh.num_classes)],
        doc: "NASViT subnet; input is normalised and already resized to the arch resolution",
        meta: vec![
            ("nasvit.arch", serde_json::to_string(&model.arch).unwrap_or_default()),
            (
                "nasvit.preprocess",
                serde_json::to_string(&model.preprocess).unwrap_or_default(),
            ),
            (
                "nasvit.labels",
                serde_json::to_string(&model.labels).unwrap_or_default(),
            ),
        ],
    }))
}

/// The ONNX model of a segmentation export (see `crate::seg`) for a fixed `h x w` input, batch 1: input `input`
/// `[1, C, h, w]` (normalised), output `logits` `[1, K, h, w]`. The sizes are fixed because each transformer
/// layer's bias is gathered from its table by an index that depends on the grid; `h` and `w` must be multiples of
/// the space's pyramid multiple. Same graph as the engine: backbone to the deepest level, the head as folded in
/// the export, `Resize` (linear, `pytorch_half_pixel`, i.e. PyTorch's `align_corners=False`) for every upsampling.
pub fn seg_to_onnx(model: &crate::seg::SegExport, h: usize, w: usize) -> Result<Vec<u8>> {
    model.check()?;
    let m = model.multiple();
    if h == 0 || w == 0 || !h.is_multiple_of(m) || !w.is_multiple_of(m) {
        return Err(InferError::Input(format!(
            "ONNX size {h}x{w}: both sides must be positive multiples of {m}"
        )));
    }
    let sh = SubnetShape::new(&model.space, &model.arch);
    let levels = crate::seg::seg_levels(&model.space, &model.arch);
    let last = levels.last().map_or(0, |l| l.0);
    let g = model.space.max_grid();
    let mut cx = Ctx {
        tensors: &model.tensors,
        b: Builder::default(),
    };
    let out_side = |x: usize, k: usize, s: usize| (x + 2 * (k / 2) - k) / s + 1;
    let wt = cx.init("stem.weight")?;
    let bs = cx.init("stem.bias")?;
    let x = cx.b.conv(INPUT_NAME, &wt, Some(&bs), 3, sh.stem_stride, 1);
    let mut cur = cx.b.swish(&x);
    let (mut gh, mut gw) = (out_side(h, 3, sh.stem_stride), out_side(w, 3, sh.stem_stride));
    let mut outs: Vec<(String, usize, usize)> = Vec::new();
    for (i, st) in sh.stages.iter().enumerate().take(last + 1) {
        for (j, blk) in st.blocks.iter().enumerate() {
            let p = format!("stages.{i}.{j}");
            cur = match *blk {
                BlockShape::MbConv {
                    cin,
                    cout,
                    kernel,
                    stride,
                    no_expand,
                    se_mid,
                    ..
                } => {
                    let y = cx.mbconv(
                        &cur,
                        &p,
                        cin,
                        cout,
                        kernel,
                        stride,
                        (gh, gw),
                        no_expand,
                        se_mid.is_some(),
                    )?;
                    (gh, gw) = (out_side(gh, kernel, stride), out_side(gw, kernel, stride));
                    y
                }
                BlockShape::Transformer {
                    c,
                    heads,
                    windows,
                    mlp_dwconv,
                    ..
                } => cx.transformer(&cur, &p, c, heads, (gh, gw), windows, mlp_dwconv, Rpb::Released { g })?,
            };
        }
        if levels.iter().any(|l| l.0 == i) {
            outs.push((cur.clone(), gh, gw));
        }
    }
    let k = model.num_classes;
    let resize = |b: &mut Builder, x: &str, c: usize, oh: usize, ow: usize| -> String {
        let sizes = b.shape(&[1, c as i64, oh as i64, ow as i64]);
        b.node(
            "Resize",
            &[x, "", "", &sizes],
            vec![
                ("mode", Attr::Str("linear")),
                ("coordinate_transformation_mode", Attr::Str("pytorch_half_pixel")),
            ],
        )
    };
    let (logits, lh, lw) = match model.head {
        crate::seg::SegHeadKind::Segformer { embed } => {
            let (h0, w0) = (outs[0].1, outs[0].2);
            let mut sum: Option<String> = None;
            for (i, (x, xh, xw)) in outs.iter().enumerate() {
                let mut y = cx.conv1x1(x, &format!("seg.linear{i}"), None, true)?;
                if (*xh, *xw) != (h0, w0) {
                    y = resize(&mut cx.b, &y, embed, h0, w0);
                }
                sum = Some(match sum {
                    None => y,
                    Some(s) => cx.b.node("Add", &[&s, &y], vec![]),
                });
            }
            let r = cx.b.node("Relu", &[&sum.unwrap_or_default()], vec![]);
            (cx.conv1x1(&r, "seg.classifier", None, true)?, h0, w0)
        }
        crate::seg::SegHeadKind::Lraspp { .. } => {
            let (x3, h3, w3) = &outs[3];
            let (x1, h1, w1) = &outs[1];
            let f = cx.conv1x1(x3, "seg.cbr", None, true)?;
            let f = cx.b.node("Relu", &[&f], vec![]);
            let pooled = cx.b.node("GlobalAveragePool", &[x3], vec![]);
            let s = cx.conv1x1(&pooled, "seg.scale", None, false)?;
            let s = cx.b.node("Sigmoid", &[&s], vec![]);
            let f = cx.b.node("Mul", &[&f, &s], vec![]);
            let mut z = cx.conv1x1(&f, "seg.high", None, true)?;
            if (h3, w3) != (h1, w1) {
                z = resize(&mut cx.b, &z, k, *h1, *w1);
            }
            let lo = cx.conv1x1(x1, "seg.low", None, true)?;
            (cx.b.node("Add", &[&lo, &z], vec![]), *h1, *w1)
        }
    };
    if (lh, lw) != (h, w) {
        resize(&mut cx.b, &logits, k, h, w);
    } else {
        cx.b.node("Identity", &[&logits], vec![]);
    }
    cx.b.name_last_output(OUTPUT_NAME);
    Ok(cx.b.encode(GraphIo {
        input: vec![Some(1), Some(sh.in_channels), Some(h), Some(w)],
        output: vec![Some(1), Some(k), Some(h), Some(w)],
        doc: "NASViT segmentation model; input normalised, its height and width fixed at export",
        meta: vec![
            ("nasvit.arch", serde_json::to_string(&model.arch).unwrap_or_default()),
            (
                "nasvit.seg_head",
                serde_json::to_string(&model.head).unwrap_or_default(),
            ),
            ("nasvit.size", format!("[{h}, {w}]")),
            ("nasvit.mean", serde_json::to_string(&model.mean).unwrap_or_default()),
            ("nasvit.std", serde_json::to_string(&model.std).unwrap_or_default()),
        ],
    }))
}

/// Writes [`seg_to_onnx`] to `path` atomically.
pub fn save_seg_onnx(model: &crate::seg::SegExport, h: usize, w: usize, path: &Path) -> Result<()> {
    let bytes = seg_to_onnx(model, h, w)?;
    crate::seg::write_atomic(path, &bytes)
}

/// Writes [`to_onnx`] to `path`.
pub fn save_onnx(model: &ExportedModel, path: &Path) -> Result<()> {
    save_onnx_with(model, path, OnnxOptions::default())
}

/// Writes [`to_onnx_with`] to `path`.
pub fn save_onnx_with(model: &ExportedModel, path: &Path, opts: OnnxOptions) -> Result<()> {
    let bytes = to_onnx_with(model, opts)?;
    std::fs::write(path, bytes).map_err(|e| InferError::io(path, e))
}

// ---------------------------------------------------------------------------------------------------------------
// Decoding (the subset written above), for checks

/// One node of a decoded graph.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxNode {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// A graph input / output: name, element type, dims (`None`: symbolic).
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxValue {
    pub name: String,
    pub elem_type: i64,
    pub dims: Vec<Option<i64>>,
}

/// An initializer: name, data type, dims, byte length of its `raw_data`.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxInit {
    pub name: String,
    pub data_type: i64,
    pub dims: Vec<i64>,
    pub raw_len: usize,
}

/// What [`inspect`] reads back from ONNX bytes.
#[derive(Clone, Debug, Default)]
pub struct OnnxSummary {
    pub ir_version: i64,
    /// `(domain, version)` pairs.
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub nodes: Vec<OnnxNode>,
    pub initializers: Vec<OnnxInit>,
    pub inputs: Vec<OnnxValue>,
    pub outputs: Vec<OnnxValue>,
    pub metadata: Vec<(String, String)>,
}

impl OnnxSummary {
    /// Checks that every node input is a graph input, an initializer or the output of an earlier node, that no
    /// value is produced twice, that every graph output is produced, and that each initializer's byte length fits
    /// its dims. Returns the first problem.
    pub fn check_topology(&self) -> std::result::Result<(), String> {
        use std::collections::HashSet;
        let mut known: HashSet<&str> = HashSet::new();
        for i in &self.inputs {
            known.insert(&i.name);
        }
        for i in &self.initializers {
            if !known.insert(&i.name) {
                return Err(format!("initializer `{}` defined twice", i.name));
            }
            let n: i64 = i.dims.iter().product();
            let size = match i.data_type {
                FLOAT => 4,
                INT64 => 8,
                t => return Err(format!("initializer `{}`: data type {t}", i.name)),
            };
            if n as usize * size != i.raw_len {
                return Err(format!(
                    "initializer `{}`: {} bytes for dims {:?}",
                    i.name, i.raw_len, i.dims
                ));
            }
        }
        for n in &self.nodes {
            for i in &n.inputs {
                if !i.is_empty() && !known.contains(i.as_str()) {
                    return Err(format!(
                        "node `{}` ({}) reads `{i}` before it is produced",
                        n.name, n.op_type
                    ));
                }
            }
            for o in &n.outputs {
                if !known.insert(o) {
                    return Err(format!("node `{}` produces `{o}` again", n.name));
                }
            }
        }
        for o in &self.outputs {
            if !known.contains(o.name.as_str()) {
                return Err(format!("graph output `{}` is never produced", o.name));
            }
        }
        Ok(())
    }
}

fn bad(reason: impl Into<String>) -> InferError {
    InferError::Meta {
        path: "<onnx bytes>".into(),
        reason: reason.into(),
    }
}

enum Field<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

/// Iterates the `(field number, value)` pairs of one message.
fn fields(mut b: &[u8]) -> Result<Vec<(u32, Field<'_>)>> {
    fn varint(b: &mut &[u8]) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or_else(|| bad("truncated varint"))?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint too long"))
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (field, wt) = ((key >> 3) as u32, key & 7);
        let f = match wt {
            WT_VARINT => Field::Int(varint(&mut b)?),
            WT_LEN => {
                let n = varint(&mut b)? as usize;
                if n > b.len() {
                    return Err(bad(format!("field {field}: length {n} past the end")));
                }
                let (v, rest) = b.split_at(n);
                b = rest;
                Field::Bytes(v)
            }
            WT_I32 | WT_I64 => {
                let n = if wt == WT_I32 { 4 } else { 8 };
                if n > b.len() {
                    return Err(bad("truncated fixed-width field"));
                }
                let (v, rest) = b.split_at(n);
                b = rest;
                let mut buf = [0u8; 8];
                buf[..n].copy_from_slice(v);
                Field::Int(u64::from_le_bytes(buf))
            }
            _ => return Err(bad(format!("field {field}: wire type {wt}"))),
        };
        out.push((field, f));
    }
    Ok(out)
}

fn text(f: &Field) -> Result<String> {
    match f {
        Field::Bytes(b) => String::from_utf8(b.to_vec()).map_err(|_| bad("string is not UTF-8")),
        Field::Int(_) => Err(bad("expected a string")),
    }
}

fn sub<'a>(f: &Field<'a>) -> Result<&'a [u8]> {
    match f {
        Field::Bytes(b) => Ok(b),
        Field::Int(_) => Err(bad("expected a message")),
    }
}

fn int(f: &Field) -> Result<i64> {
    match f {
        Field::Int(v) => Ok(*v as i64),
        Field::Bytes(_) => Err(bad("expected an integer")),
    }
}

fn decode_value(b: &[u8]) -> Result<OnnxValue> {
    let mut v = OnnxValue {
        name: String::new(),
        elem_type: 0,
        dims: Vec::new(),
    };
    for (n, f) in fields(b)? {
        match n {
            1 => v.name = text(&f)?,
            2 => {
                for (n, f) in fields(sub(&f)?)? {
                    if n != 1 {
                        continue;
                    }
                    for (n, f) in fields(sub(&f)?)? {
                        match n {
                            1 => v.elem_type = int(&f)?,
                            2 => {
                                for (_, d) in fields(sub(&f)?)? {
                                    let mut dim = None;
                                    for (n, f) in fields(sub(&d)?)? {
                                        if n == 1 {
                                            dim = Some(int(&f)?);
                                        }
                                    }
                                    v.dims.push(dim);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(v)
}

/// Decodes the header, graph structure and initializer layout of ONNX bytes (the subset this module writes).
pub fn inspect(bytes: &[u8]) -> Result<OnnxSummary> {
    let mut s = OnnxSummary::default();
    let mut graph = None;
    for (n, f) in fields(bytes)? {
        match n {
            1 => s.ir_version = int(&f)?,
            2 => s.producer = text(&f)?,
            7 => graph = Some(sub(&f)?),
            8 => {
                let mut op = (String::new(), 0);
                for (n, f) in fields(sub(&f)?)? {
                    match n {
                        1 => op.0 = text(&f)?,
                        2 => op.1 = int(&f)?,
                        _ => {}
                    }
                }
                s.opsets.push(op);
            }
            14 => {
                let mut kv = (String::new(), String::new());
                for (n, f) in fields(sub(&f)?)? {
                    match n {
                        1 => kv.0 = text(&f)?,
                        2 => kv.1 = text(&f)?,
                        _ => {}
                    }
                }
                s.metadata.push(kv);
            }
            _ => {}
        }
    }
    let graph = graph.ok_or_else(|| bad("no graph"))?;
    for (n, f) in fields(graph)? {
        match n {
            1 => {
                let mut node = OnnxNode {
                    name: String::new(),
                    op_type: String::new(),
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                };
                for (n, f) in fields(sub(&f)?)? {
                    match n {
                        1 => node.inputs.push(text(&f)?),
                        2 => node.outputs.push(text(&f)?),
                        3 => node.name = text(&f)?,
                        4 => node.op_type = text(&f)?,
                        _ => {}
                    }
                }
                s.nodes.push(node);
            }
            5 => {
                let mut init = OnnxInit {
                    name: String::new(),
                    data_type: 0,
                    dims: Vec::new(),
                    raw_len: 0,
                };
                for (n, f) in fields(sub(&f)?)? {
                    match n {
                        1 => init.dims.push(int(&f)?),
                        2 => init.data_type = int(&f)?,
                        8 => init.name = text(&f)?,
                        9 => init.raw_len = sub(&f)?.len(),
                        _ => {}
                    }
                }
                s.initializers.push(init);
            }
            11 => s.inputs.push(decode_value(sub(&f)?)?),
            12 => s.outputs.push(decode_value(sub(&f)?)?),
            _ => {}
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX] {
            let mut p = Pb::default();
            p.int(3, v as i64);
            let f = fields(&p.0).unwrap();
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].0, 3);
            assert_eq!(int(&f[0].1).unwrap() as u64, v);
        }
        // -1 as int64 is ten bytes.
        let mut p = Pb::default();
        p.int(1, -1);
        assert_eq!(p.0.len(), 11);
    }
}
