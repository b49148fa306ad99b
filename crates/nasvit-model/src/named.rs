//! Parameters by key name: the module tree's path (enum variants add no level), i.e. the released key names.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor, TensorData};

/// Path bookkeeping shared by the visitors: enum variant levels are skipped.
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn enter(&mut self, name: &str, container: &str) {
        if !container.starts_with("Enum") {
            self.0.push(name.to_string());
        }
    }
    fn exit(&mut self, container: &str) {
        if !container.starts_with("Enum") {
            self.0.pop();
        }
    }
    fn key(&self) -> String {
        self.0.join(".")
    }
}

struct Collect<F: FnMut(String, TensorRef)> {
    path: Path,
    f: F,
}

/// A visited float parameter, whatever its rank.
pub(crate) enum TensorRef<'a> {
    R1(&'a Param<Tensor<1>>),
    R2(&'a Param<Tensor<2>>),
    R3(&'a Param<Tensor<3>>),
    R4(&'a Param<Tensor<4>>),
}

impl<F: FnMut(String, TensorRef)> ModuleVisitor for Collect<F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(container_type);
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let key = self.path.key();
        // Every parameter of this crate has rank 1 to 4; the casts below only re-label `D`.
        let any: &dyn std::any::Any = param;
        let r = if let Some(p) = any.downcast_ref::<Param<Tensor<1>>>() {
            TensorRef::R1(p)
        } else if let Some(p) = any.downcast_ref::<Param<Tensor<2>>>() {
            TensorRef::R2(p)
        } else if let Some(p) = any.downcast_ref::<Param<Tensor<3>>>() {
            TensorRef::R3(p)
        } else if let Some(p) = any.downcast_ref::<Param<Tensor<4>>>() {
            TensorRef::R4(p)
        } else {
            return;
        };
        (self.f)(key, r);
    }
}

fn visit_named<M: Module>(m: &M, f: impl FnMut(String, TensorRef)) {
    let mut v = Collect {
        path: Path::default(),
        f,
    };
    m.visit(&mut v);
}

impl TensorRef<'_> {
    fn data(&self) -> TensorData {
        match self {
            TensorRef::R1(p) => p.val().to_data(),
            TensorRef::R2(p) => p.val().to_data(),
            TensorRef::R3(p) => p.val().to_data(),
            TensorRef::R4(p) => p.val().to_data(),
        }
    }
    fn shape(&self) -> Vec<usize> {
        match self {
            TensorRef::R1(p) => p.dims().to_vec(),
            TensorRef::R2(p) => p.dims().to_vec(),
            TensorRef::R3(p) => p.dims().to_vec(),
            TensorRef::R4(p) => p.dims().to_vec(),
        }
    }
    fn grad(&self, grads: &Gradients) -> Option<TensorData> {
        match self {
            TensorRef::R1(p) => p.val().grad(grads).map(|g| g.to_data()),
            TensorRef::R2(p) => p.val().grad(grads).map(|g| g.to_data()),
            TensorRef::R3(p) => p.val().grad(grads).map(|g| g.to_data()),
            TensorRef::R4(p) => p.val().grad(grads).map(|g| g.to_data()),
        }
    }
}

/// Every float tensor of a module (parameters and BN running statistics) by key, in visiting order.
pub fn named_tensors<M: Module>(m: &M) -> Vec<(String, TensorData)> {
    let mut out = Vec::new();
    visit_named(m, |k, r| out.push((k, r.data())));
    out
}

/// The shape of every float tensor of a module by key.
pub fn named_shapes<M: Module>(m: &M) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    visit_named(m, |k, r| {
        out.insert(k, r.shape());
    });
    out
}

/// The gradient of every parameter that has one, by key (max-size shape, zero outside the active slice).
pub fn named_grads<M: Module>(m: &M, grads: &Gradients) -> Vec<(String, TensorData)> {
    let mut out = Vec::new();
    visit_named(m, |k, r| {
        if let Some(g) = r.grad(grads) {
            out.push((k, g));
        }
    });
    out
}

struct Replace<'a> {
    path: Path,
    tensors: &'a HashMap<String, TensorData>,
}

impl ModuleMapper for Replace<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(container_type);
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.key();
        match self.tensors.get(&key) {
            Some(data) if data.shape().to_vec() == param.dims().to_vec() => {
                let device = param.lazy_device();
                let t = Tensor::<D>::from_data(data.clone(), &device);
                let id = param.id;
                param.transform_for_load(t, id)
            }
            _ => param,
        }
    }
}

/// Replaces the tensors whose key is in `tensors` (same shape; checked by the caller), keeping parameter ids.
pub(crate) fn replace_named<M: Module>(m: M, tensors: &HashMap<String, TensorData>) -> M {
    let mut r = Replace {
        path: Path::default(),
        tensors,
    };
    m.map(&mut r)
}
