//! Datasets, transforms and loaders as a (resolved) [`TrainConfig`] describes them, so that the training
//! loop, BN re-calibration and the search build their data the same way.

use std::sync::Arc;

use super::transforms::Normalize;
use super::{
    holdout_per_class, DataError, Dataset, EvalTransform, FolderDataset, IdxDataset, Loader, LoaderConfig, RandAugment,
    Subset, TrainTransform,
};
use crate::config::{DataKind, TrainConfig, IMAGENET_MEAN, IMAGENET_STD};

/// Fallback crop side for a config that was not resolved.
const DEFAULT_CROP: usize = 224;

/// The datasets of a run.
#[derive(Clone)]
pub struct Datasets {
    /// Training images, without the held-out ones.
    pub train: Arc<dyn Dataset>,
    /// The validation split, when the config names one (IDX `val_*` files, or `root/<val_split>` exists).
    pub val: Option<Arc<dyn Dataset>>,
    /// `holdout_per_class` images per class carved out of the training set, for the search.
    pub holdout: Option<Arc<dyn Dataset>>,
}

fn missing(field: &str) -> DataError {
    DataError::Config(format!("`{field}` is not set"))
}

/// Opens the datasets of `config` and checks their labels against `data.num_classes`.
pub fn open_datasets(config: &TrainConfig) -> Result<Datasets, DataError> {
    let d = &config.data;
    let (train, val): (Arc<dyn Dataset>, Option<Arc<dyn Dataset>>) = match d.kind {
        DataKind::Idx => {
            let images = d.train_images.as_deref().ok_or_else(|| missing("data.train_images"))?;
            let labels = d.train_labels.as_deref().ok_or_else(|| missing("data.train_labels"))?;
            let train = Arc::new(IdxDataset::open(images, labels)?);
            let val = match (d.val_images.as_deref(), d.val_labels.as_deref()) {
                (Some(images), Some(labels)) => Some(Arc::new(IdxDataset::open(images, labels)?) as Arc<dyn Dataset>),
                _ => None,
            };
            (train, val)
        }
        DataKind::Folder => {
            let root = d.root.as_deref().ok_or_else(|| missing("data.root"))?;
            let train = Arc::new(FolderDataset::open(root, &d.train_split)?);
            let val = if root.join(&d.val_split).is_dir() {
                let val = FolderDataset::open(root, &d.val_split)?;
                if val.classes() != train.classes() {
                    return Err(DataError::Layout {
                        path: root.join(&d.val_split).display().to_string(),
                        reason: format!("its class folders differ from those of `{}`", d.train_split),
                    });
                }
                Some(Arc::new(val) as Arc<dyn Dataset>)
            } else {
                None
            };
            (train, val)
        }
    };
    if let Some(classes) = d.num_classes {
        for (name, set) in [("training", Some(&train)), ("validation", val.as_ref())] {
            if let Some(set) = set.filter(|s| s.num_classes() > classes) {
                return Err(DataError::Config(format!(
                    "the {name} data has {} classes but the model has {classes} (data.num_classes)",
                    set.num_classes()
                )));
            }
        }
    }
    let (train, holdout) = if d.holdout_per_class > 0 {
        let (kept, held) = holdout_per_class(&*train, d.holdout_per_class, config.seed);
        let holdout: Arc<dyn Dataset> = Arc::new(Subset::new(train.clone(), held));
        (Arc::new(Subset::new(train, kept)) as Arc<dyn Dataset>, Some(holdout))
    } else {
        (train, None)
    };
    Ok(Datasets { train, val, holdout })
}

/// The normalisation of `config` (ImageNet statistics when unresolved).
pub fn normalize(config: &TrainConfig) -> Normalize {
    let to_f32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<_>>();
    Normalize {
        mean: to_f32(config.augment.mean.as_deref().unwrap_or(&IMAGENET_MEAN)),
        std: to_f32(config.augment.std.as_deref().unwrap_or(&IMAGENET_STD)),
    }
}

pub fn train_transform(config: &TrainConfig) -> TrainTransform {
    let a = &config.augment;
    TrainTransform {
        size: a.crop_size.unwrap_or(DEFAULT_CROP),
        scale: a.scale,
        ratio: a.ratio,
        hflip: a.hflip,
        randaug: (a.randaug_n > 0).then(|| RandAugment::increasing(a.randaug_n, a.randaug_m, a.randaug_mstd)),
        erasing_p: a.erasing_p,
        normalize: normalize(config),
    }
}

pub fn eval_transform(config: &TrainConfig) -> EvalTransform {
    let a = &config.augment;
    EvalTransform {
        size: a.crop_size.unwrap_or(DEFAULT_CROP),
        crop_pct: a.eval_crop_pct,
        normalize: normalize(config),
    }
}

/// Shuffled, augmented, full batches of `config.batch_size`.
pub fn train_loader(config: &TrainConfig, train: Arc<dyn Dataset>) -> Loader {
    let loader_config = LoaderConfig {
        batch_size: config.batch_size,
        workers: config.data.workers,
        prefetch: config.data.prefetch,
        seed: config.seed,
        shuffle: true,
        drop_last: true,
    };
    Loader::new(train, Arc::new(train_transform(config)), loader_config)
}

/// Dataset-order batches through the evaluation transform (validation, search, BN re-calibration
/// with `shuffle` when the calibration should see a random sample).
pub fn eval_loader(config: &TrainConfig, data: Arc<dyn Dataset>, batch_size: usize, shuffle: bool) -> Loader {
    let loader_config = LoaderConfig {
        batch_size,
        workers: config.data.workers,
        prefetch: config.data.prefetch,
        seed: config.seed,
        shuffle,
        drop_last: false,
    };
    Loader::new(data, Arc::new(eval_transform(config)), loader_config)
}
