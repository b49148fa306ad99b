//! `nasvit seg infer`: a segmentation model's prediction (by the engine or burn, [`SegRunner`]) for single photos, written as files a user (or
//! `nasvit seg score`) reads: per photo `<stem>.png`, the class ids as an 8-bit grey PNG, and
//! `<stem>_overlay.png`, the photo blended with the class colours. Both are written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Result, SegError};
use crate::eval::{predict, InferMode, SegRunner};
use crate::label::{read_rgb, write_label_png, write_overlay_png};
use crate::palette::Palette;

/// The colours of a model's overlays when none is asked for: VOC's for a 21-class model (VOC's class count),
/// generated ones otherwise.
pub fn default_palette(num_classes: usize) -> Palette {
    if num_classes == 21 {
        Palette::voc()
    } else {
        Palette::generated(num_classes)
    }
}

/// The two files written for one photo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferOutput {
    pub image: PathBuf,
    pub labels: PathBuf,
    pub overlay: PathBuf,
    pub width: u32,
    pub height: u32,
}

/// The output stem of each photo (its file stem). Two photos that would write the same file (`a.jpg` and
/// `a.png`, or `a.jpg` and `a_overlay.jpg`) are an error naming both, found before any model runs.
pub fn output_stems(images: &[PathBuf]) -> Result<Vec<String>> {
    let mut stems = Vec::with_capacity(images.len());
    let mut owner: BTreeMap<String, &Path> = BTreeMap::new();
    for image in images {
        let stem = image
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| SegError::io(image, "no UTF-8 file name to name the outputs after"))?;
        for name in [format!("{stem}.png"), format!("{stem}_overlay.png")] {
            if let Some(other) = owner.insert(name.clone(), image) {
                return Err(SegError::Input(format!(
                    "{} and {} would both write {name}: rename one",
                    other.display(),
                    image.display()
                )));
            }
        }
        stems.push(stem.to_string());
    }
    Ok(stems)
}

/// Runs the model on the photo at `image` and writes `out/<stem>.png` and `out/<stem>_overlay.png`.
pub fn infer_image(
    runner: &SegRunner,
    image: &Path,
    stem: &str,
    out: &Path,
    palette: &Palette,
    mode: InferMode,
) -> Result<InferOutput> {
    let img = read_rgb(image)?;
    let (width, height) = img.dimensions();
    let labels = predict(runner, &img, mode).map_err(|e| SegError::image(image, e))?;
    let label_path = out.join(format!("{stem}.png"));
    let overlay_path = out.join(format!("{stem}_overlay.png"));
    write_label_png(&label_path, &labels, width, height)?;
    write_overlay_png(&overlay_path, &img, &labels, palette)?;
    Ok(InferOutput {
        image: image.to_path_buf(),
        labels: label_path,
        overlay: overlay_path,
        width,
        height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colliding_outputs_are_named() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(output_stems(&[p("x/a.jpg"), p("y/b.png")]).unwrap(), vec!["a", "b"]);
        let e = output_stems(&[p("x/a.jpg"), p("y/a.png")]).unwrap_err().to_string();
        assert!(e.contains("x/a.jpg and y/a.png would both write a.png"), "{e}");
        let e = output_stems(&[p("a.jpg"), p("a_overlay.jpg")]).unwrap_err().to_string();
        assert!(e.contains("a_overlay.png"), "{e}");
    }

    #[test]
    fn voc_colours_for_21_classes() {
        assert_eq!(default_palette(21), Palette::voc());
        assert_eq!(default_palette(11), Palette::generated(11));
    }
}
