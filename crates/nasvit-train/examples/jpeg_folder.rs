//! Writes an ImageNet-style folder of real JPEGs for loader benchmarks (`nasvit data bench`): the first N images of
//! an IDX data set (e.g. Fashion-MNIST), upscaled bilinearly to SIZE x SIZE RGB and JPEG-encoded (quality 90),
//! as `OUT/train/<class>/<i>.jpg` and the next N/5 as `OUT/val/<class>/<i>.jpg`.
//!
//! cargo run --release -p nasvit-train --example jpeg_folder -- \
//!     /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
//!     /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz OUT [N=5000] [SIZE=224]

use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::imageops::{resize, FilterType};
use image::{GrayImage, RgbImage};
use nasvit_train::data::{Dataset, IdxDataset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: jpeg_folder IMAGES.idx[.gz] LABELS.idx[.gz] OUT [N=5000] [SIZE=224]");
        std::process::exit(2);
    }
    let ds = IdxDataset::open(Path::new(&args[0]), Path::new(&args[1]))?;
    let out = PathBuf::from(&args[2]);
    let n: usize = args.get(3).map_or(Ok(5000), |s| s.parse())?;
    let size: u32 = args.get(4).map_or(Ok(224), |s| s.parse())?;
    let total = (n + n / 5).min(ds.len());
    for i in 0..total {
        let s = ds.get(i)?;
        let img = &s.image;
        let grey = GrayImage::from_raw(
            img.width as u32,
            img.height as u32,
            img.data.iter().step_by(img.channels).copied().collect(),
        )
        .ok_or("image size")?;
        let big = resize(&grey, size, size, FilterType::Triangle);
        let rgb = RgbImage::from_fn(size, size, |x, y| {
            let v = big.get_pixel(x, y)[0];
            image::Rgb([v, v, v])
        });
        let split = if i < n { "train" } else { "val" };
        let dir = out.join(split).join(format!("{:02}", s.label));
        std::fs::create_dir_all(&dir)?;
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&rgb)?;
        std::fs::write(dir.join(format!("{i:06}.jpg")), bytes)?;
    }
    println!("wrote {total} JPEGs of {size}x{size} under {}", out.display());
    Ok(())
}
