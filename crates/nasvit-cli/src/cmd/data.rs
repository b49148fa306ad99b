//! `--data PATH` of the commands that read images: a training config (YAML) naming its data, a folder of
//! MNIST-style IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-...` as the validation split), or an
//! ImageNet-style folder (`PATH/train/<class>/*.jpg`, `PATH/val/<class>/*.jpg`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use burn::tensor::{Device, Tensor, TensorData};
use nasvit_search::Batch as EvalBatch;
use nasvit_space::SearchSpace;
use nasvit_train::config::{DataKind, TrainConfig};
use nasvit_train::data::Batch;

/// Help text shared by every `--data` option.
pub const DATA_HELP: &str = "A training config (YAML) naming its data, a folder of MNIST-style IDX files \
(train-images-idx3-ubyte[.gz], t10k-* as validation; e.g. /usr/share/datasets/fashion-mnist), or an ImageNet-style \
folder with train/<class>/ and val/<class>/ image folders";

fn idx_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [format!("{stem}.gz"), stem.to_string()]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// The resolved training config for `--data PATH` (its data, transforms and batch size).
pub fn data_config(path: &Path, space: &SearchSpace) -> anyhow::Result<TrainConfig> {
    let mut config = if path.is_file() {
        TrainConfig::from_file(path).with_context(|| format!("reading the config {}", path.display()))?
    } else if path.is_dir() {
        let mut c = TrainConfig::default();
        if let Some(images) = idx_file(path, "train-images-idx3-ubyte") {
            c.data.kind = DataKind::Idx;
            c.data.train_images = Some(images);
            c.data.train_labels = idx_file(path, "train-labels-idx1-ubyte");
            c.data.val_images = idx_file(path, "t10k-images-idx3-ubyte");
            c.data.val_labels = idx_file(path, "t10k-labels-idx1-ubyte");
        } else if path.join("train").is_dir() {
            c.data.kind = DataKind::Folder;
            c.data.root = Some(path.to_path_buf());
        } else {
            bail!(
                "{}: neither IDX files (train-images-idx3-ubyte[.gz]) nor a train/ folder of class folders",
                path.display()
            );
        }
        c
    } else {
        bail!("{}: no such file or folder", path.display());
    };
    config.space = space.name.clone();
    config
        .resolve_with_space(space)
        .with_context(|| format!("resolving the data of {}", path.display()))
}

/// A loader batch as the evaluator takes it.
pub fn to_eval_batch(batch: Batch, device: &Device) -> EvalBatch {
    let labels = batch.labels.iter().map(|&l| l.max(0) as usize).collect();
    let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), device);
    (x, labels)
}
