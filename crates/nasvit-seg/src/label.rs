//! Label maps as files: 8-bit class-id PNGs in, grey or palette PNGs out, photos in, colour overlays out.
//!
//! A label PNG holds one class id per pixel. Grey PNGs hold it as the grey value; palette PNGs (VOC's
//! `SegmentationClass`) hold it as the palette *index*, whatever colour the palette gives it, so palette PNGs are
//! read as raw indices with the `png` crate and never converted to RGB (a colour lookup would need the dataset's
//! palette and breaks on the many palette PNGs whose colours were edited). 1-, 2- and 4-bit grey/palette PNGs
//! are unpacked to ids; RGB, grey + alpha and 16-bit PNGs are refused: they are pictures of labels, not labels.
//!
//! Every size read from a file is checked before anything of that size is allocated ([`MAX_SIDE`],
//! [`MAX_DECODE_BYTES`]); a corrupt file is an error naming it, never a panic.

use std::io::Cursor;
use std::path::Path;

use image::{ImageReader, Limits, RgbImage};

use crate::error::{Result, SegError};
use crate::io::write_atomic;
use crate::metric::IGNORE;
use crate::palette::Palette;

/// The largest image side accepted from a file.
pub const MAX_SIDE: u32 = 16_384;
/// The most bytes one decode may allocate.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// The largest label file read (a compressed 16384^2 map of few classes is far smaller).
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// One label map: `labels[y * width + x]` is the class id (or 255, ignore) of pixel `(x, y)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    pub width: u32,
    pub height: u32,
    pub labels: Vec<u8>,
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path).map_err(|e| SegError::io(path, e))?.len();
    if len > MAX_FILE_BYTES {
        return Err(SegError::io(
            path,
            format!("{len} bytes, more than the {MAX_FILE_BYTES} accepted"),
        ));
    }
    std::fs::read(path).map_err(|e| SegError::io(path, e))
}

/// Reads a label PNG (8-bit or packed grey / palette).
pub fn read_label_png(path: &Path) -> Result<LabelMap> {
    let bytes = read_file(path)?;
    decode_label_png(&bytes).map_err(|reason| SegError::label(path, reason))
}

/// Decodes label PNG bytes; the error says why (the caller adds the file).
pub fn decode_label_png(bytes: &[u8]) -> std::result::Result<LabelMap, String> {
    // The png crate reports corrupt data as errors; the unwind guard keeps a decoder bug on a hostile file an
    // error too, as everywhere else files are read.
    std::panic::catch_unwind(|| decode_label_png_inner(bytes)).unwrap_or_else(|_| Err("the PNG decoder failed".into()))
}

fn decode_label_png_inner(bytes: &[u8]) -> std::result::Result<LabelMap, String> {
    use png::{BitDepth, ColorType};
    let mut dec = png::Decoder::new_with_limits(
        Cursor::new(bytes),
        png::Limits {
            bytes: MAX_DECODE_BYTES as usize,
        },
    );
    let info = dec.read_header_info().map_err(|e| format!("not a readable PNG: {e}"))?;
    let (width, height) = (info.width, info.height);
    check_size(width, height)?;
    let (color, depth) = (info.color_type, info.bit_depth);
    match color {
        ColorType::Grayscale | ColorType::Indexed => {}
        other => {
            return Err(format!(
                "a {other:?} PNG: label maps must be 8-bit grey or palette PNGs whose values (indices) are class ids"
            ))
        }
    }
    let bits = match depth {
        BitDepth::One => 1,
        BitDepth::Two => 2,
        BitDepth::Four => 4,
        BitDepth::Eight => 8,
        BitDepth::Sixteen => return Err("a 16-bit PNG: class ids are 8-bit".into()),
    };
    let mut reader = dec.read_info().map_err(|e| format!("not a readable PNG: {e}"))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| format!("{width}x{height} pixels overflow the decode buffer"))?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("corrupt PNG data: {e}"))?;
    let (w, h) = (width as usize, height as usize);
    let line = frame.line_size;
    if line * h > buf.len() || line * 8 < w * bits {
        return Err(format!(
            "decoded rows of {line} bytes do not hold {w} pixels of {bits} bits"
        ));
    }
    let mut labels = Vec::with_capacity(w * h);
    for row in buf.chunks_exact(line).take(h) {
        if bits == 8 {
            labels.extend_from_slice(&row[..w]);
        } else {
            let per_byte = 8 / bits;
            let mask = (1u8 << bits) - 1;
            labels.extend((0..w).map(|x| (row[x / per_byte] >> (8 - bits * (x % per_byte + 1))) & mask));
        }
    }
    Ok(LabelMap { width, height, labels })
}

fn check_size(width: u32, height: u32) -> std::result::Result<(), String> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(format!("{width}x{height} pixels: sides must be in 1..={MAX_SIDE}"));
    }
    Ok(())
}

fn check_labels(labels: &[u8], width: u32, height: u32) -> Result<()> {
    check_size(width, height).map_err(SegError::Input)?;
    if labels.len() != width as usize * height as usize {
        return Err(SegError::Input(format!(
            "{} labels for a {width}x{height} map",
            labels.len()
        )));
    }
    Ok(())
}

fn png_err(e: impl std::fmt::Display) -> SegError {
    SegError::Input(format!("PNG encoding: {e}"))
}

/// A label map as PNG bytes: grey (the value is the id) without a palette, palette (the index is the id, the
/// colours from `palette`) with one.
pub fn encode_label_png(labels: &[u8], width: u32, height: u32, palette: Option<&Palette>) -> Result<Vec<u8>> {
    check_labels(labels, width, height)?;
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_depth(png::BitDepth::Eight);
        match palette {
            Some(p) => {
                enc.set_color(png::ColorType::Indexed);
                enc.set_palette(p.plte());
            }
            None => enc.set_color(png::ColorType::Grayscale),
        }
        let mut w = enc.write_header().map_err(png_err)?;
        w.write_image_data(labels).map_err(png_err)?;
        w.finish().map_err(png_err)?;
    }
    Ok(out)
}

/// Writes a grey label PNG, atomically.
pub fn write_label_png(path: &Path, labels: &[u8], width: u32, height: u32) -> Result<()> {
    write_atomic(path, &encode_label_png(labels, width, height, None)?)
}

/// Writes a palette label PNG (VOC style: viewable, and still class ids to a reader of indices), atomically.
pub fn write_palette_png(path: &Path, labels: &[u8], width: u32, height: u32, palette: &Palette) -> Result<()> {
    write_atomic(path, &encode_label_png(labels, width, height, Some(palette))?)
}

/// Decodes a photo (JPEG or PNG, any colour type) to 8-bit RGB under the size limits.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = read_file(path)?;
    decode_rgb(&bytes).map_err(|reason| SegError::image(path, reason))
}

/// Decodes photo bytes; the error says why (the caller adds the file).
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let fmt = image::guess_format(bytes).map_err(|e| format!("unknown image format: {e}"))?;
    if fmt == image::ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        // Some JPEG decoders fill a truncated scan with grey and succeed; refuse it rather than train on it.
        return Err("truncated JPEG (no end-of-image marker)".into());
    }
    let decoded = std::panic::catch_unwind(|| {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), fmt);
        let mut limits = Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(MAX_DECODE_BYTES);
        reader.limits(limits);
        reader.decode()
    });
    match decoded {
        Ok(Ok(img)) => Ok(img.to_rgb8()),
        Ok(Err(e)) => Err(format!("cannot decode: {e}")),
        Err(_) => Err("the decoder failed on a corrupt file".into()),
    }
}

/// A complete JPEG ends with the EOI marker `FF D9` (some writers pad after it).
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// An RGB image as PNG bytes.
pub fn encode_rgb_png(img: &RgbImage) -> std::result::Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}

/// Writes an RGB image as a PNG, atomically.
pub fn write_rgb_png(path: &Path, img: &RgbImage) -> Result<()> {
    let bytes = encode_rgb_png(img).map_err(|e| SegError::io(path, e))?;
    write_atomic(path, &bytes)
}

/// The image with each labelled pixel blended with its class colour: `(1 - alpha) * pixel + alpha * colour`.
/// Ignored pixels (255) and ids the palette has no colour for are left as they are.
pub fn overlay(img: &RgbImage, labels: &[u8], palette: &Palette, alpha: f32) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    check_labels(labels, w, h)?;
    let a = alpha.clamp(0.0, 1.0);
    let mut out = img.clone();
    for (px, &id) in out.pixels_mut().zip(labels) {
        if id == IGNORE {
            continue;
        }
        if let Some(c) = palette.color(id) {
            for (v, c) in px.0.iter_mut().zip(c) {
                *v = ((1.0 - a) * f32::from(*v) + a * f32::from(c)).round() as u8;
            }
        }
    }
    Ok(out)
}

/// Writes [`overlay`] with alpha 0.5 as a PNG, atomically.
pub fn write_overlay_png(path: &Path, img: &RgbImage, labels: &[u8], palette: &Palette) -> Result<()> {
    write_rgb_png(path, &overlay(img, labels, palette, 0.5)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(color: png::ColorType, depth: png::BitDepth, w: u32, h: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        if color == png::ColorType::Indexed {
            // a palette whose colours have nothing to do with the ids: only the indices may matter
            enc.set_palette(vec![255u8; 3 * 16]);
        }
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(data).unwrap();
        wr.finish().unwrap();
        out
    }

    #[test]
    fn grey_and_palette_round_trip_to_the_same_ids() {
        let labels = vec![0, 1, 2, 255, 7, 7];
        for pal in [None, Some(Palette::voc())] {
            let bytes = encode_label_png(&labels, 3, 2, pal.as_ref()).unwrap();
            let m = decode_label_png(&bytes).unwrap();
            assert_eq!((m.width, m.height, m.labels.as_slice()), (3, 2, labels.as_slice()));
        }
    }

    #[test]
    fn palette_indices_are_read_raw_even_at_4_bits() {
        // 5 x 2 pixels, 4-bit indices 1 2 3 4 5 / 15 0 9 8 7, packed high nibble first, rows padded to a byte
        let data = [0x12, 0x34, 0x50, 0xF0, 0x98, 0x70];
        let bytes = png_bytes(png::ColorType::Indexed, png::BitDepth::Four, 5, 2, &data);
        let m = decode_label_png(&bytes).unwrap();
        assert_eq!(m.labels, vec![1, 2, 3, 4, 5, 15, 0, 9, 8, 7]);
        // 1-bit grey: 1 0 1 1 0 0 1 0 1
        let bytes = png_bytes(
            png::ColorType::Grayscale,
            png::BitDepth::One,
            9,
            1,
            &[0b1011_0010, 0b1000_0000],
        );
        assert_eq!(
            decode_label_png(&bytes).unwrap().labels,
            vec![1, 0, 1, 1, 0, 0, 1, 0, 1]
        );
    }

    #[test]
    fn rgb_and_16_bit_pngs_are_refused_with_a_reason() {
        let rgb = png_bytes(png::ColorType::Rgb, png::BitDepth::Eight, 1, 1, &[1, 2, 3]);
        let e = decode_label_png(&rgb).unwrap_err();
        assert!(e.contains("Rgb PNG") && e.contains("palette"), "{e}");
        let deep = png_bytes(png::ColorType::Grayscale, png::BitDepth::Sixteen, 1, 1, &[0, 1]);
        assert!(decode_label_png(&deep).unwrap_err().contains("16-bit"));
    }

    #[test]
    fn oversized_headers_and_garbage_are_errors_before_allocation() {
        let mut huge = encode_label_png(&[0], 1, 1, None).unwrap();
        // IHDR's width is bytes 16..20 and its CRC (over type + data) bytes 29..33: a valid header of 100 000 x 1
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&huge[12..29]);
        huge[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        let e = decode_label_png(&huge).unwrap_err();
        assert_eq!(e, "100000x1 pixels: sides must be in 1..=16384");
        assert!(decode_label_png(b"not a png")
            .unwrap_err()
            .contains("not a readable PNG"));
        let good = encode_label_png(&[3; 64], 8, 8, None).unwrap();
        for cut in [10, 40, good.len() - 13] {
            assert!(decode_label_png(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_rgb(b"\xFF\xD8\xFF garbage").is_err());
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.png");
        std::fs::write(&p, b"junk").unwrap();
        let e = read_label_png(&p).unwrap_err().to_string();
        assert!(e.contains("bad.png") && e.contains("not a readable PNG"), "{e}");
        let e = read_rgb(&dir.path().join("missing.jpg")).unwrap_err().to_string();
        assert!(e.contains("missing.jpg"), "{e}");
    }

    #[test]
    fn overlay_blends_half_and_skips_ignore() {
        let img = RgbImage::from_pixel(3, 1, image::Rgb([100, 100, 100]));
        let pal = Palette::new(vec![[0, 0, 0], [200, 0, 50]]);
        let out = overlay(&img, &[1, 255, 9], &pal, 0.5).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [150, 50, 75]);
        assert_eq!(out.get_pixel(1, 0).0, [100, 100, 100]);
        assert_eq!(out.get_pixel(2, 0).0, [100, 100, 100]);
        assert!(overlay(&img, &[1, 1], &pal, 0.5).is_err());
    }
}
