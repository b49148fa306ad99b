//! Checkpoints: ONE safetensors file whose tensors use exactly the released key names.
//!
//! `__metadata__` holds `"nasvit.format" = "1"`, `"nasvit.space"` (the space as JSON, the golden `space.json`
//! layout), `"nasvit.arch"` (the active arch as JSON) and any free metadata the caller adds. All tensors are F32.
//! Any tool can read the file by key name; [`import_official`] reads a released state dict converted to
//! safetensors (it ignores `*bn_tracking*`, `*num_batches_tracked`, `*relative_position_index` and the unused
//! MBConv `rescale` buffers).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use nasvit_space::{Arch, SearchSpace};

use crate::error::ModelError;
use crate::named::{named_shapes, named_tensors, replace_named};
use crate::supernet::{supernet_floats, Supernet, SupernetConfig};

/// Metadata key of the format version.
pub const META_FORMAT: &str = "nasvit.format";
/// Metadata key of the space (JSON).
pub const META_SPACE: &str = "nasvit.space";
/// Metadata key of the active arch (JSON).
pub const META_ARCH: &str = "nasvit.arch";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: &str = "1";

/// Writes `net` to `path` (through a temporary file in the same folder, then a rename).
pub fn save_checkpoint(
    net: &Supernet,
    path: &Path,
    extra_metadata: &BTreeMap<String, String>,
) -> Result<(), ModelError> {
    let mut meta: HashMap<String, String> = extra_metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta.insert(META_FORMAT.into(), FORMAT_VERSION.into());
    meta.insert(META_SPACE.into(), net.space().to_json().to_string());
    meta.insert(META_ARCH.into(), net.arch().to_json());
    write_tensors(named_tensors(net), meta, path)
}

/// Writes named tensors (converted to F32) with metadata to `path` via a temporary file and a rename.
pub fn write_tensors(
    tensors: Vec<(String, TensorData)>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<(), ModelError> {
    let io = |e: String| ModelError::Io {
        path: path.display().to_string(),
        reason: e,
    };
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (k, data) in tensors {
        let shape = data.shape().to_vec();
        let values: Vec<f32> = data
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| io(format!("tensor {k}: {e:?}")))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((k, shape, bytes));
    }
    let mut views = Vec::with_capacity(owned.len());
    for (k, shape, bytes) in &owned {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(|e| io(format!("tensor {k}: {e}")))?;
        views.push((k.clone(), view));
    }
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    safetensors::serialize_to_file(views, &Some(metadata), &tmp).map_err(|e| io(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e.to_string())
    })
}

/// Reads a nasvit checkpoint written by [`save_checkpoint`]; the space (and the active arch) come from its metadata.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Supernet, ModelError> {
    let bytes = read(path)?;
    let meta = metadata(&bytes, path)?;
    let not_ckpt = |reason: String| ModelError::NotACheckpoint {
        path: path.display().to_string(),
        reason,
    };
    match meta.get(META_FORMAT) {
        Some(v) if v == FORMAT_VERSION => {}
        Some(v) => {
            return Err(not_ckpt(format!(
                "format version {v}, this build reads {FORMAT_VERSION}"
            )))
        }
        None => {
            return Err(not_ckpt(format!(
                "no `{META_FORMAT}` metadata (use import_official for a released state dict)"
            )))
        }
    }
    let space_json = meta
        .get(META_SPACE)
        .ok_or_else(|| not_ckpt(format!("no `{META_SPACE}` metadata")))?;
    let space = SearchSpace::from_yaml_str(space_json, "checkpoint")?;
    // The declared space must fit the file before anything is built from it: a small file whose metadata
    // declares a huge space would otherwise allocate that space's supernet first.
    let needed = supernet_floats(&space);
    let held = file_floats(&bytes, path)?;
    if needed > held {
        return Err(not_ckpt(format!(
            "its metadata declares a space whose supernet holds {needed} values, the file holds {held}"
        )));
    }
    // The init values are all overwritten: the default seed does.
    let mut net = load_tensors(SupernetConfig::new(space).init(device), &bytes, path)?;
    if let Some(arch_json) = meta.get(META_ARCH) {
        let arch = Arch::from_str_any(arch_json)?;
        net.set_active(&arch)?;
    }
    Ok(net)
}

/// Number of values of the tensors of a safetensors file (from its header; nothing is converted).
fn file_floats(bytes: &[u8], path: &Path) -> Result<u128, ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors {
        path: path.display().to_string(),
        reason: format!("{e:?}"),
    })?;
    Ok(st
        .tensors()
        .iter()
        .map(|(_, v)| v.shape().iter().map(|&d| d as u128).product::<u128>())
        .sum())
}

/// The metadata of a safetensors file (empty when it has none).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, ModelError> {
    let bytes = read(path)?;
    metadata(&bytes, path)
}

/// Builds a supernet of `space` from a released state dict converted to safetensors (keys as released, no
/// `module.` prefix). Fails with one error listing every missing, unexpected and mis-shaped key.
pub fn import_official(path: &Path, space: &SearchSpace, device: &Device) -> Result<Supernet, ModelError> {
    let bytes = read(path)?;
    let net = SupernetConfig::new(space.clone()).try_init(device, crate::supernet::MAX_SUPERNET_FLOATS)?;
    load_tensors(net, &bytes, path)
}

/// Keys of a released state dict that the port does not hold.
pub fn is_ignored_key(key: &str) -> bool {
    if key.contains("bn_tracking") || key.ends_with("num_batches_tracked") || key.ends_with("relative_position_index") {
        return true;
    }
    // blocks.{i}.mobile_inverted_conv.rescale: an unused buffer of ones.
    key.starts_with("blocks.") && key.ends_with(".mobile_inverted_conv.rescale")
}

fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|e| ModelError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn metadata(bytes: &[u8], path: &Path) -> Result<HashMap<String, String>, ModelError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Safetensors {
        path: path.display().to_string(),
        reason: format!("{e:?}"),
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Float values of a tensor view of any float dtype, as F32.
fn view_to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let d = view.data();
    match view.dtype() {
        Dtype::F32 => Some(
            d.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F64 => Some(
            d.chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
        ),
        Dtype::F16 => Some(
            d.chunks_exact(2)
                .map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        Dtype::BF16 => Some(
            d.chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
        ),
        _ => None,
    }
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) & 1) as u32;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let v = if exp == 0 {
        (frac as f32) * 2f32.powi(-24)
    } else if exp == 31 {
        if frac == 0 {
            f32::INFINITY
        } else {
            f32::NAN
        }
    } else {
        (1.0 + frac as f32 / 1024.0) * 2f32.powi(exp - 15)
    };
    if sign == 1 {
        -v
    } else {
        v
    }
}

/// Checks every key of the file against the supernet, then loads all of them.
fn load_tensors(net: Supernet, bytes: &[u8], path: &Path) -> Result<Supernet, ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors {
        path: path.display().to_string(),
        reason: format!("{e:?}"),
    })?;
    let expected = named_shapes(&net);
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = st.names();
    names.sort();
    for key in names {
        if is_ignored_key(key) {
            continue;
        }
        let Ok(view) = st.tensor(key) else {
            problems.push(format!("  unreadable key `{key}`"));
            continue;
        };
        let Some(want) = expected.get(key.as_str()) else {
            problems.push(format!("  unexpected key `{key}` {:?}", view.shape()));
            continue;
        };
        seen.insert(key.clone());
        if view.shape() != want.as_slice() {
            problems.push(format!(
                "  mis-shaped key `{key}`: expected {want:?}, got {:?}",
                view.shape()
            ));
            continue;
        }
        match view_to_f32(&view) {
            Some(values) => {
                tensors.insert(key.clone(), TensorData::new(values, want.clone()));
            }
            None => problems.push(format!(
                "  key `{key}` has dtype {:?}, expected a float type",
                view.dtype()
            )),
        }
    }
    for (key, shape) in &expected {
        if !seen.contains(key) {
            problems.push(format!("  missing key `{key}` {shape:?}"));
        }
    }
    if !problems.is_empty() {
        return Err(ModelError::KeyMismatch {
            path: path.display().to_string(),
            space: net.space().name.clone(),
            problems,
        });
    }
    Ok(replace_named(net, &tensors))
}

impl Supernet {
    /// Every float tensor (parameters and BN running statistics) by released key name.
    pub fn named_tensors(&self) -> Vec<(String, TensorData)> {
        named_tensors(self)
    }

    /// Replaces tensors by key (parameters and BN running statistics, max-size shapes), keeping parameter ids so
    /// that an optimizer's state or an EMA keyed by them still applies. Every key must name a tensor of this
    /// supernet with its shape; keys not given keep their values.
    pub fn replace_tensors(self, tensors: &HashMap<String, TensorData>) -> Result<Self, ModelError> {
        let shapes = named_shapes(&self);
        let mut problems = Vec::new();
        for (k, t) in tensors {
            match shapes.get(k) {
                Some(s) if s.as_slice() == t.shape().to_vec().as_slice() => {}
                Some(s) => problems.push(format!("{k}: shape {:?}, expected {s:?}", t.shape())),
                None => problems.push(format!("{k}: not a tensor of this supernet")),
            }
        }
        if !problems.is_empty() {
            problems.sort();
            return Err(ModelError::Tensors(problems.join("; ")));
        }
        Ok(replace_named(self, tensors))
    }

    /// The BN running statistics (`*.bn.bn.running_mean` / `running_var`) by key, at max size.
    pub fn bn_stats(&self) -> Vec<(String, TensorData)> {
        named_tensors(self).into_iter().filter(|(k, _)| is_bn_stat(k)).collect()
    }

    /// Replaces BN running statistics by key (`NAME.bn.bn.running_mean` / `running_var`, max-size `[C_max]`).
    /// Keys not given keep their values. Every key must name a BN statistic of this supernet with its shape.
    pub fn set_bn_stats<I>(&mut self, stats: I) -> Result<(), ModelError>
    where
        I: IntoIterator<Item = (String, Tensor<1>)>,
    {
        let shapes = named_shapes(self);
        let mut map = HashMap::new();
        let mut problems = Vec::new();
        for (k, t) in stats {
            match shapes.get(&k) {
                Some(s) if is_bn_stat(&k) && s.as_slice() == t.dims().as_slice() => {
                    map.insert(k, t.to_data());
                }
                Some(s) if is_bn_stat(&k) => problems.push(format!("`{k}`: expected {s:?}, got {:?}", t.dims())),
                _ => problems.push(format!("`{k}` is not a BN running statistic of this supernet")),
            }
        }
        if !problems.is_empty() {
            return Err(ModelError::BnStats(problems.join("; ")));
        }
        *self = replace_named(self.clone(), &map);
        Ok(())
    }
}

fn is_bn_stat(key: &str) -> bool {
    key.ends_with("running_mean") || key.ends_with("running_var")
}
