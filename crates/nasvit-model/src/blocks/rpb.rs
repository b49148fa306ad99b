//! Relative position index into the `(2G - 1)^2`-row bias table (G = the space's largest token grid).
//!
//! For query `(y1, x1)` and key `(y2, x2)` of a `w x w` grid (the whole map, or one window of it) the row is
//! `(y1 - y2 + G - 1) * (2G - 1) + (x1 - x2 + G - 1)`. This equals the released code's crop of its
//! precomputed `G^2 x G^2` index to the top-left `w x w` sub-grid, which is why it is recomputed rather than
//! stored (`relative_position_index` is ignored on import).

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Row indices `[w^2 * w^2]` (query-major) for a `w x w` grid and a table built for grids up to `g_max`.
pub fn relative_position_index(w: usize, g_max: usize) -> Vec<i64> {
    let n = w * w;
    let g = g_max as i64;
    let side = 2 * g - 1;
    let mut idx = Vec::with_capacity(n * n);
    for i in 0..n {
        let (y1, x1) = ((i / w) as i64, (i % w) as i64);
        for j in 0..n {
            let (y2, x2) = ((j / w) as i64, (j % w) as i64);
            idx.push((y1 - y2 + g - 1) * side + (x1 - x2 + g - 1));
        }
    }
    idx
}

/// [`relative_position_index`] as an int tensor.
pub fn relative_position_index_tensor(w: usize, g_max: usize, device: &Device) -> Tensor<1, Int> {
    let idx = relative_position_index(w, g_max);
    let len = idx.len();
    Tensor::from_data(TensorData::new(idx, [len]), device)
}

/// Side `G` of the largest grid a table of `rows = (2G - 1)^2` rows serves.
pub fn grid_of_table_rows(rows: usize) -> usize {
    let side = (rows as f64).sqrt().round() as usize;
    side.div_ceil(2)
}
