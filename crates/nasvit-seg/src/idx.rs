//! A small reader of MNIST-style IDX files (unsigned bytes, gzipped or not) for the generated set. nasvit-train
//! has the full one, but depending on it would pull burn into this crate.

use std::io::{BufRead, Read};
use std::path::Path;

use flate2::read::GzDecoder;

use crate::error::{Result, SegError};

/// The most values one file may declare (Fashion-MNIST's training images: 47 M).
pub const MAX_VALUES: u64 = 1 << 28;

/// A parsed IDX array: its dimensions and its bytes.
#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes; gzip (by its magic) is inflated no further than the header declares.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let file = std::fs::File::open(path).map_err(|e| SegError::io(path, e))?;
    let mut probe = std::io::BufReader::new(file);
    let gzipped = probe
        .fill_buf()
        .map_err(|e| SegError::io(path, e))?
        .starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read> = if gzipped {
        Box::new(GzDecoder::new(probe))
    } else {
        Box::new(probe)
    };
    let bad = |reason: String| SegError::io(path, format!("not an IDX file of bytes: {reason}"));
    let mut header = [0u8; 4];
    reader.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    if header[0] != 0 || header[1] != 0 || header[2] != 0x08 {
        return Err(bad(format!("magic {header:02x?}, expected 00 00 08 <ndims>")));
    }
    let ndims = usize::from(header[3]);
    if ndims == 0 {
        return Err(bad("zero dimensions".into()));
    }
    let mut dims = Vec::with_capacity(ndims);
    let mut total = 1u64;
    for _ in 0..ndims {
        let mut d = [0u8; 4];
        reader.read_exact(&mut d).map_err(|e| bad(e.to_string()))?;
        let d = u32::from_be_bytes(d);
        total = total.saturating_mul(u64::from(d));
        dims.push(d as usize);
    }
    if total > MAX_VALUES {
        return Err(bad(format!(
            "dimensions {dims:?} declare more than {MAX_VALUES} values"
        )));
    }
    let mut data = Vec::new();
    reader
        .take(total)
        .read_to_end(&mut data)
        .map_err(|e| SegError::io(path, e))?;
    if (data.len() as u64) < total {
        return Err(bad(format!(
            "truncated: {} of the {total} values its header declares",
            data.len()
        )));
    }
    Ok(IdxArray { dims, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn reads_plain_and_gzipped_and_refuses_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = idx(&[2, 1, 3], &[1, 2, 3, 4, 5, 6]);
        let plain = dir.path().join("a");
        std::fs::write(&plain, &bytes).unwrap();
        let gz = dir.path().join("a.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        for p in [&plain, &gz] {
            let a = read_idx(p).unwrap();
            assert_eq!((a.dims, a.data), (vec![2, 1, 3], vec![1, 2, 3, 4, 5, 6]));
        }
        std::fs::write(&plain, &bytes[..bytes.len() - 1]).unwrap();
        let e = read_idx(&plain).unwrap_err().to_string();
        assert!(e.contains("truncated: 5 of the 6"), "{e}");
        std::fs::write(&plain, idx(&[65536, 65536], &[])).unwrap();
        assert!(read_idx(&plain).unwrap_err().to_string().contains("more than"));
    }
}
