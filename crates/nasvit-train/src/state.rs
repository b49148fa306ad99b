//! Training checkpoints of a run folder.
//!
//! ```text
//! RUN/
//!   config.yaml            resolved config
//!   metrics.jsonl          one JSON line per logged step / evaluation / event
//!   last -> checkpoints/step-00001000
//!   checkpoints/step-00001000/
//!     supernet.safetensors   EMA weights (or raw, `--save-raw`), nasvit checkpoint: what eval/search/export read
//!     train_state.safetensors  raw weights (`model.KEY`) and EMA weights (`ema.KEY`), every float tensor incl. BN statistics;
//!                            with the cpu engine also AdamW's moments (`adam_m.KEY`, `adam_v.KEY`)
//!     optimizer.bpk          burn engine: AdamW state (burn optimizer record, burnpack)
//!     train_state.json       step, epoch, EMA update count, seed, parameter ids, engine, cpu engine: AdamW step counts
//! ```
//!
//! A checkpoint folder is written under a temporary name and renamed into place, then `last` is replaced
//! (symlink renamed over the old one), so a killed run leaves the previous checkpoint intact.
//!
//! AdamW's state is keyed by burn parameter ids; the sidecar stores the id of every parameter by key name and
//! loading gives the parameters of the rebuilt supernet those ids again, so the optimizer record applies as
//! saved.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::ModuleOptimizer;
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_model::checkpoint::write_tensors;
use nasvit_model::{save_checkpoint, Supernet, SupernetConfig};
use nasvit_space::SearchSpace;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::ema::ModelEma;

pub const SUPERNET_FILE: &str = "supernet.safetensors";
pub const STATE_FILE: &str = "train_state.safetensors";
pub const OPTIM_FILE: &str = "optimizer.bpk";
pub const SIDECAR_FILE: &str = "train_state.json";
pub const LAST: &str = "last";
pub const CHECKPOINTS: &str = "checkpoints";
/// Metadata key of the step in `train_state.safetensors`.
pub const STEP_KEY: &str = "nasvit.train.step";

/// Why a training state cannot be written or read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct StateError {
    pub path: String,
    pub reason: String,
}

fn serr(path: &Path, reason: impl Into<String>) -> StateError {
    StateError {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The JSON sidecar of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateMeta {
    pub format: u32,
    /// Completed iterations.
    pub step: u64,
    /// Epoch of the next iteration.
    pub epoch: u64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub ema_updates: u64,
    pub ema_decay: f64,
    /// Seed of the loader and of the per-step subnet sampling (`sandwich::step_rng(seed, step)`).
    pub seed: u64,
    pub skipped_files: usize,
    /// Wall time of the run so far, seconds.
    pub wall_s: f64,
    /// `supernet.safetensors` holds the EMA weights (`true`) or the raw ones.
    pub supernet_is_ema: bool,
    /// burn parameter id of every parameter, by key.
    pub param_ids: BTreeMap<String, u64>,
    /// The engine that wrote the checkpoint (`burn` or `cpu`); its optimizer state is only readable by it.
    #[serde(default = "burn_engine")]
    pub engine: String,
    /// cpu engine: AdamW steps taken per tensor, by key (tensors never stepped are absent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adam_steps: BTreeMap<String, u32>,
}

fn burn_engine() -> String {
    "burn".into()
}

/// The optimizer state a checkpoint stores.
pub enum OptimState<'a> {
    /// burn's AdamW record (`optimizer.bpk`).
    Burn(&'a ModuleOptimizer),
    /// The cpu engine's AdamW moments (flat, in the layout of `store`); the step counts go in the sidecar.
    Cpu {
        store: &'a crate::cpu::Store,
        m: &'a [f32],
        v: &'a [f32],
    },
}

/// AdamW's state of the cpu engine, as restored from a checkpoint.
pub struct CpuAdam {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub t: Vec<u32>,
}

/// What a checkpoint restores.
pub struct Restored {
    pub meta: StateMeta,
    pub model: Supernet,
    pub ema: ModelEma<Supernet>,
    pub optim: ModuleOptimizer,
}

/// Keys and ids of the parameters (and running statistics) of a module; enum levels are skipped.
struct Ids {
    path: Vec<String>,
    out: BTreeMap<String, u64>,
}

impl ModuleVisitor for Ids {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum") {
            self.path.push(name.to_string());
        }
    }
    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if !container_type.starts_with("Enum") {
            self.path.pop();
        }
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.insert(self.path.join("."), param.id.val());
    }
}

/// burn parameter ids by key (the keys of [`nasvit_model::named_tensors`]).
pub fn param_ids<M: Module>(m: &M) -> BTreeMap<String, u64> {
    let mut v = Ids {
        path: Vec::new(),
        out: BTreeMap::new(),
    };
    m.visit(&mut v);
    v.out
}

/// Replaces tensors by key and (when given) gives parameters their saved ids.
struct Load<'a> {
    path: Vec<String>,
    tensors: &'a HashMap<String, TensorData>,
    ids: Option<&'a BTreeMap<String, u64>>,
    missing: Vec<String>,
}

impl ModuleMapper for Load<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum") {
            self.path.push(name.to_string());
        }
    }
    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if !container_type.starts_with("Enum") {
            self.path.pop();
        }
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.join(".");
        let id = self
            .ids
            .and_then(|ids| ids.get(&key))
            .map_or(param.id, |v| ParamId::from(*v));
        match self.tensors.get(&key) {
            Some(data) if data.shape().to_vec() == param.dims().to_vec() => {
                let device = param.lazy_device();
                let t = Tensor::<D>::from_data(data.clone(), &device);
                param.transform_for_load(t, id)
            }
            _ => {
                self.missing.push(key);
                param
            }
        }
    }
}

/// Replaces the tensors of `model` by key (all must be given, with their shapes) and, when `ids` is given, gives
/// its parameters their saved burn ids, so that a saved optimizer record applies to the rebuilt module.
pub fn load_module<M: Module>(
    model: M,
    tensors: &HashMap<String, TensorData>,
    ids: Option<&BTreeMap<String, u64>>,
    path: &Path,
) -> Result<M, StateError> {
    load_into(model, tensors, ids, path)
}

fn load_into<M: Module>(
    model: M,
    tensors: &HashMap<String, TensorData>,
    ids: Option<&BTreeMap<String, u64>>,
    path: &Path,
) -> Result<M, StateError> {
    let mut l = Load {
        path: Vec::new(),
        tensors,
        ids,
        missing: Vec::new(),
    };
    let model = model.map(&mut l);
    if l.missing.is_empty() {
        Ok(model)
    } else {
        Err(serr(
            path,
            format!("missing or mis-shaped tensors: {}", l.missing.join(", ")),
        ))
    }
}

/// The folder `RUN/last` points at.
pub fn resolve_last(run_dir: &Path) -> Option<PathBuf> {
    let last = run_dir.join(LAST);
    let target = std::fs::read_link(&last)
        .ok()
        .or_else(|| std::fs::read_to_string(&last).ok().map(|s| PathBuf::from(s.trim())))?;
    let dir = if target.is_absolute() {
        target
    } else {
        run_dir.join(target)
    };
    dir.is_dir().then_some(dir)
}

/// Writes a checkpoint of step `meta.step` into `RUN/checkpoints/step-NNNNNNNN`, moves `last` to it and keeps
/// the newest `keep` checkpoints besides. Returns the checkpoint folder.
pub fn save_state(
    run_dir: &Path,
    meta: &StateMeta,
    model: &Supernet,
    ema: &ModelEma<Supernet>,
    optim: OptimState,
    extra_metadata: &BTreeMap<String, String>,
    keep: usize,
) -> Result<PathBuf, StateError> {
    let ckpts = run_dir.join(CHECKPOINTS);
    std::fs::create_dir_all(&ckpts).map_err(|e| serr(&ckpts, e.to_string()))?;
    let name = format!("step-{:08}", meta.step);
    let dir = ckpts.join(&name);
    let tmp = ckpts.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| serr(&tmp, e.to_string()))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| serr(&tmp, e.to_string()))?;

    let mut published = ema.model().clone();
    let mut meta_map = extra_metadata.clone();
    meta_map.insert("nasvit.train.step".into(), meta.step.to_string());
    meta_map.insert(
        "nasvit.train.weights".into(),
        if meta.supernet_is_ema { "ema" } else { "raw" }.into(),
    );
    if !meta.supernet_is_ema {
        published = model.valid();
    }
    published
        .set_active(&published.space().max_arch())
        .map_err(|e| serr(&tmp, e.to_string()))?;
    save_checkpoint(&published, &tmp.join(SUPERNET_FILE), &meta_map).map_err(|e| serr(&tmp, e.to_string()))?;

    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    for (k, v) in nasvit_model::named_tensors(model) {
        tensors.push((format!("model.{k}"), v));
    }
    for (k, v) in nasvit_model::named_tensors(ema.model()) {
        tensors.push((format!("ema.{k}"), v));
    }
    if let OptimState::Cpu { store, m, v } = &optim {
        for t in (0..store.tensors()).filter(|&t| store.trainable[t]) {
            let shape = store.shapes[t].clone();
            tensors.push((
                format!("adam_m.{}", store.keys[t]),
                TensorData::new(m[store.range(t)].to_vec(), shape.clone()),
            ));
            tensors.push((
                format!("adam_v.{}", store.keys[t]),
                TensorData::new(v[store.range(t)].to_vec(), shape),
            ));
        }
    }
    let mut st_meta = HashMap::new();
    st_meta.insert("nasvit.space".to_string(), model.space().to_json().to_string());
    // the step again inside the tensor file: a sidecar that does not belong to it (edited, copied) is caught
    st_meta.insert(STEP_KEY.to_string(), meta.step.to_string());
    // a checkpoint is only written whole and finite: the "last good checkpoint" a failed run names must train
    if let Some((k, _)) = tensors.iter().find(|(_, d)| d.iter::<f32>().any(|v| !v.is_finite())) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(serr(
            run_dir,
            format!(
                "non-finite values in `{k}` at step {}: no checkpoint written",
                meta.step
            ),
        ));
    }
    write_tensors(tensors, st_meta, &tmp.join(STATE_FILE)).map_err(|e| serr(&tmp, e.to_string()))?;
    if let OptimState::Burn(optim) = optim {
        optim
            .save(tmp.join(OPTIM_FILE))
            .map_err(|e| serr(&tmp.join(OPTIM_FILE), format!("{e:?}")))?;
    }
    let json = serde_json::to_string_pretty(meta).map_err(|e| serr(&tmp, e.to_string()))?;
    std::fs::write(tmp.join(SIDECAR_FILE), json).map_err(|e| serr(&tmp, e.to_string()))?;

    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| serr(&dir, e.to_string()))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| serr(&dir, e.to_string()))?;
    point_last(run_dir, &format!("{CHECKPOINTS}/{name}"))?;
    prune(&ckpts, &name, keep);
    Ok(dir)
}

/// Points `RUN/last` at `rel` (a path relative to the run folder) by an atomic rename of a new link.
pub fn point_last(run_dir: &Path, rel: &str) -> Result<(), StateError> {
    let last = run_dir.join(LAST);
    let tmp = run_dir.join(format!(".last.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(rel, &tmp).map_err(|e| serr(&tmp, e.to_string()))?;
    #[cfg(not(unix))]
    std::fs::write(&tmp, rel).map_err(|e| serr(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &last).map_err(|e| serr(&last, e.to_string()))
}

/// Removes all but the newest `keep` step folders (never `current`).
pub fn prune(ckpts: &Path, current: &str, keep: usize) {
    let Ok(entries) = std::fs::read_dir(ckpts) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") && n != current)
        .collect();
    names.sort();
    let keep_others = keep.saturating_sub(1);
    let excess = names.len().saturating_sub(keep_others);
    for n in &names[..excess] {
        let _ = std::fs::remove_dir_all(ckpts.join(n));
    }
}

/// Tensors by key.
type Named = HashMap<String, TensorData>;

/// The tensors of a state file by prefix: raw weights (`model.`), EMA (`ema.`), AdamW moments (`adam_m.`,
/// `adam_v.`).
struct StateTensors {
    model: Named,
    ema: Named,
    adam_m: Named,
    adam_v: Named,
    /// The step in the file's metadata (absent in files of older versions).
    step: Option<String>,
}

fn read_state_tensors(path: &Path) -> Result<StateTensors, StateError> {
    let bytes = std::fs::read(path).map_err(|e| serr(path, e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| serr(path, format!("not a safetensors file: {e}")))?;
    let step = SafeTensors::read_metadata(&bytes)
        .ok()
        .and_then(|(_, m)| m.metadata().as_ref().and_then(|m| m.get(STEP_KEY).cloned()));
    let mut out = StateTensors {
        model: HashMap::new(),
        ema: HashMap::new(),
        adam_m: HashMap::new(),
        adam_v: HashMap::new(),
        step,
    };
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(serr(path, format!("tensor {name} is {:?}, F32 expected", view.dtype())));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let data = TensorData::new(values, view.shape().to_vec());
        for (prefix, map) in [
            ("model.", &mut out.model),
            ("ema.", &mut out.ema),
            ("adam_m.", &mut out.adam_m),
            ("adam_v.", &mut out.adam_v),
        ] {
            if let Some(k) = name.strip_prefix(prefix) {
                map.insert(k.to_string(), data);
                break;
            }
        }
    }
    Ok(out)
}

/// Reads the sidecar of a checkpoint folder.
pub fn read_meta(dir: &Path) -> Result<StateMeta, StateError> {
    let path = dir.join(SIDECAR_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| serr(&path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| serr(&path, e.to_string()))
}

/// The weights of a checkpoint folder: raw weights on `device` (an autodiff device for training; parameter ids
/// as saved), the EMA on its plain counterpart, and the sidecar.
pub fn load_weights(
    dir: &Path,
    space: &SearchSpace,
    device: &Device,
) -> Result<(StateMeta, Supernet, ModelEma<Supernet>), StateError> {
    let meta = read_meta(dir)?;
    let state_path = dir.join(STATE_FILE);
    let t = read_state_tensors(&state_path)?;
    if let Some(step) = &t.step {
        if step.parse::<u64>().ok() != Some(meta.step) {
            return Err(serr(
                dir,
                format!(
                    "{SIDECAR_FILE} says step {}, {STATE_FILE} holds step {step}: the two do not belong together",
                    meta.step
                ),
            ));
        }
    }
    // The fresh values are all overwritten: any seed does.
    let fresh = SupernetConfig::new(space.clone()).init(device);
    let model = load_into(fresh, &t.model, Some(&meta.param_ids), &state_path)?;
    let ema_model = load_into(model.valid(), &t.ema, None, &state_path)?;
    let ema = ModelEma::from_parts(ema_model, meta.ema_decay, meta.ema_updates);
    Ok((meta, model, ema))
}

/// Restores a checkpoint folder of the burn engine: [`load_weights`] and `optim` (a freshly built optimiser of the
/// same config) with its saved state.
pub fn load_state(
    dir: &Path,
    space: &SearchSpace,
    device: &Device,
    optim: ModuleOptimizer,
) -> Result<Restored, StateError> {
    let (meta, model, ema) = load_weights(dir, space, device)?;
    if meta.engine != "burn" {
        return Err(serr(
            dir,
            format!(
                "written by the {} engine; its optimizer state is not burn's (resume with engine: {})",
                meta.engine, meta.engine
            ),
        ));
    }
    let optim_path = dir.join(OPTIM_FILE);
    let optim = optim
        .load(&optim_path)
        .map_err(|e| serr(&optim_path, format!("cannot read the optimizer state: {e:?}")))?;
    Ok(Restored {
        meta,
        model,
        ema,
        optim,
    })
}

/// The cpu engine's AdamW state of a checkpoint folder, in the layout of `store`.
pub fn load_cpu_adam(dir: &Path, meta: &StateMeta, store: &crate::cpu::Store) -> Result<CpuAdam, StateError> {
    if meta.engine != "cpu" {
        return Err(serr(
            dir,
            format!(
                "written by the {} engine; its optimizer state is not the cpu engine's (resume with engine: {})",
                meta.engine, meta.engine
            ),
        ));
    }
    let path = dir.join(STATE_FILE);
    let t = read_state_tensors(&path)?;
    let mut m = vec![0.0f32; store.len()];
    let mut v = vec![0.0f32; store.len()];
    let mut steps = vec![0u32; store.tensors()];
    for i in (0..store.tensors()).filter(|&i| store.trainable[i]) {
        let key = &store.keys[i];
        for (map, dst, name) in [(&t.adam_m, &mut m, "adam_m"), (&t.adam_v, &mut v, "adam_v")] {
            let d = map
                .get(key)
                .ok_or_else(|| serr(&path, format!("{name}.{key} missing")))?;
            let vals = d
                .try_to_vec::<f32>()
                .map_err(|e| serr(&path, format!("{name}.{key}: {e:?}")))?;
            if vals.len() != store.range(i).len() {
                return Err(serr(
                    &path,
                    format!("{name}.{key}: {} values, expected {}", vals.len(), store.range(i).len()),
                ));
            }
            dst[store.range(i)].copy_from_slice(&vals);
        }
        steps[i] = meta.adam_steps.get(key).copied().unwrap_or(0);
    }
    Ok(CpuAdam { m, v, t: steps })
}
