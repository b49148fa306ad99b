//! ImageNet-style folders: `root/<split>/<class>/*.{jpg,jpeg,png}`. Classes are the sub-folders of the
//! split sorted by name (so class indices agree between splits and with torchvision's `ImageFolder`);
//! files are sorted by name within a class. Images are decoded on demand, one file per sample.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Image, Sample};

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Images listed from `root/<split>/<class>/`.
#[derive(Debug, Clone)]
pub struct FolderDataset {
    classes: Vec<String>,
    files: Vec<PathBuf>,
    labels: Vec<usize>,
}

fn io_err(path: &Path, e: std::io::Error) -> DataError {
    DataError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .map(|entry| entry.map(|e| e.path()).map_err(|e| io_err(dir, e)))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort();
    Ok(entries)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

impl FolderDataset {
    /// Lists `root/split`. Classes without any image still count (keeping indices stable between
    /// splits); a split without any image is an error.
    pub fn open(root: &Path, split: &str) -> Result<Self, DataError> {
        let dir = root.join(split);
        let class_dirs: Vec<PathBuf> = sorted_entries(&dir)?.into_iter().filter(|p| p.is_dir()).collect();
        if class_dirs.is_empty() {
            return Err(DataError::Layout {
                path: dir.display().to_string(),
                reason: "no class folders (expected <split>/<class>/*.jpg)".into(),
            });
        }
        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for (label, class_dir) in class_dirs.iter().enumerate() {
            classes.push(
                class_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            for file in sorted_entries(class_dir)?
                .into_iter()
                .filter(|p| p.is_file() && is_image(p))
            {
                files.push(file);
                labels.push(label);
            }
        }
        if files.is_empty() {
            return Err(DataError::Layout {
                path: dir.display().to_string(),
                reason: "no .jpg/.jpeg/.png files in any class folder".into(),
            });
        }
        Ok(Self { classes, files, labels })
    }

    /// Class names, index = label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn path(&self, index: usize) -> &Path {
        &self.files[index]
    }
}

/// Decodes an image file to 8-bit grey (1 channel) or RGB (3 channels, alpha dropped).
pub fn decode_file(path: &Path) -> Result<Image, DataError> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    decode_bytes(&bytes, &path.display().to_string())
}

/// Decodes image bytes (format guessed from the content); `name` is used in errors.
pub fn decode_bytes(bytes: &[u8], name: &str) -> Result<Image, DataError> {
    let decoded = image::load_from_memory(bytes).map_err(|e| DataError::Decode {
        path: name.to_string(),
        reason: e.to_string(),
    })?;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    if width == 0 || height == 0 {
        return Err(DataError::Decode {
            path: name.to_string(),
            reason: "empty image".into(),
        });
    }
    let grey = matches!(
        decoded.color(),
        image::ColorType::L8 | image::ColorType::L16 | image::ColorType::La8
    );
    Ok(if grey {
        Image {
            width,
            height,
            channels: 1,
            data: decoded.into_luma8().into_raw(),
        }
    } else {
        Image {
            width,
            height,
            channels: 3,
            data: decoded.into_rgb8().into_raw(),
        }
    })
}

impl Dataset for FolderDataset {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn label(&self, index: usize) -> usize {
        self.labels[index]
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if index >= self.len() {
            return Err(DataError::OutOfRange { index, len: self.len() });
        }
        Ok(Sample {
            image: decode_file(&self.files[index])?,
            label: self.labels[index],
        })
    }

    fn source(&self, index: usize) -> String {
        self.files
            .get(index)
            .map_or_else(|| format!("<index {index}>"), |p| p.display().to_string())
    }
}
