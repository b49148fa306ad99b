//! Relative position index into the `(2G - 1)^2`-row bias table (G = the space's largest token grid).
//!
//! For query `(y1, x1)` and key `(y2, x2)` of a `w x w` grid (the whole map, or one window of it) the row is
//! `(y1 - y2 + G - 1) * (2G - 1) + (x1 - x2 + G - 1)`. This equals the released code's crop of its
//! precomputed `G^2 x G^2` index to the top-left `w x w` sub-grid, which is why it is recomputed rather than
//! stored (`relative_position_index` is ignored on import).

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Row indices `[w^2 * w^2]` (query-major) for a `w x w` grid and a table built for grids up to `g_max`.
pub fn relative_position_index(w: usize, g_max: usize) -> Vec<i64> {
    relative_position_index_rect(w, w, g_max)
}

/// Row indices `[(h w)^2]` (query-major) for an `h x w` grid (segmentation: any shape, any size).
///
/// Rule for grids the table was not built for: an offset beyond the table's reach (`|dy|` or `|dx| > G - 1`,
/// only on a side longer than `G`) is clipped to the table's edge row, as Shaw et al. (2018) clip relative
/// positions. Within `G x G`, and so on every classification input, this is the released index unchanged;
/// clipping keeps the trained rows where they were and needs no resampling of the table (bicubic resampling, as
/// Swin does, would move every learnt bias of a classification checkpoint).
pub fn relative_position_index_rect(h: usize, w: usize, g_max: usize) -> Vec<i64> {
    let n = h * w;
    let g = g_max as i64;
    let side = 2 * g - 1;
    let reach = |d: i64| d.clamp(-(g - 1), g - 1) + g - 1;
    let mut idx = Vec::with_capacity(n * n);
    for i in 0..n {
        let (y1, x1) = ((i / w) as i64, (i % w) as i64);
        for j in 0..n {
            let (y2, x2) = ((j / w) as i64, (j % w) as i64);
            idx.push(reach(y1 - y2) * side + reach(x1 - x2));
        }
    }
    idx
}

/// [`relative_position_index_rect`] as an int tensor.
pub fn relative_position_index_tensor(h: usize, w: usize, g_max: usize, device: &Device) -> Tensor<1, Int> {
    let idx = relative_position_index_rect(h, w, g_max);
    let len = idx.len();
    Tensor::from_data(TensorData::new(idx, [len]), device)
}

/// Side `G` of the largest grid a table of `rows = (2G - 1)^2` rows serves.
pub fn grid_of_table_rows(rows: usize) -> usize {
    let side = (rows as f64).sqrt().round() as usize;
    side.div_ceil(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rectangle_within_the_table_indexes_like_the_released_square_crop() {
        let g = 4;
        let side = 2 * g as i64 - 1;
        // the released index: the top-left h x w sub-grid of the G x G grid's full index
        let full = relative_position_index(g, g);
        let (h, w) = (2, 3);
        let cells: Vec<usize> = (0..h).flat_map(|y| (0..w).map(move |x| y * g + x)).collect();
        let mut want = Vec::new();
        for &i in &cells {
            for &j in &cells {
                want.push(full[i * g * g + j]);
            }
        }
        assert_eq!(relative_position_index_rect(h, w, g), want);
        // a larger grid clips: offsets of 5 and 6 rows take the row of offset 3 = G - 1
        let big = relative_position_index_rect(7, 1, g);
        let row = |dy: i64| (dy + g as i64 - 1) * side + (g as i64 - 1);
        assert_eq!(big[6 * 7], row(3)); // query row 6, key row 0: offset 6
        assert_eq!(big[5 * 7], row(3));
        assert_eq!(big[3 * 7], row(3));
        assert_eq!(big[2 * 7], row(2));
        assert_eq!(big[6], row(-3)); // query row 0, key row 6
        assert!(big.iter().all(|&r| r >= 0 && r < side * side));
    }
}
