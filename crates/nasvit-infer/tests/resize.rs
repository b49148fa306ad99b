//! The bicubic input resize against values worked out by hand from PyTorch's definition (a = -0.75,
//! align_corners = false, clamped border).

// The expected values are exact binary fractions (k / 256), written out in full.
#![allow(clippy::excessive_precision)]

use nasvit_infer::resize::bicubic;

#[test]
fn bicubic_two_to_four_by_hand() {
    // Width 2 -> 4: source x = (dst + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25.
    // dst 0: t = 0.75, taps x = -2..1 clamped to (0, 0, 0, 1), weights
    //   cubic2(1.75) = -0.03515625, cubic1(0.75) = 0.26171875, cubic1(0.25) = 0.87890625, cubic2(1.25) = -0.10546875
    //   -> 1.10546875 a - 0.10546875 b.
    // dst 1: t = 0.25, taps (0, 0, 1, 1), weights (-0.10546875, 0.87890625, 0.26171875, -0.03515625)
    //   -> 0.7734375 a + 0.2265625 b.  dst 2, 3 mirror these.
    let row = [-0.10546875f32, 0.2265625, 0.7734375, 1.10546875];
    let y = bicubic(&[0.0, 1.0], 1, 1, 2, 1, 4);
    for (g, w) in y.iter().zip(row) {
        assert!((g - w).abs() < 1e-6, "{y:?}");
    }
    // 2x2 [[0, 1], [2, 3]] -> 4x4: the rows above, then the same weights down the columns
    // (row r0 + 2 * (0 - 0.10546875 ... ) etc.): offsets -0.2109375, 0.453125, 1.546875, 2.2109375.
    let y = bicubic(&[0.0, 1.0, 2.0, 3.0], 1, 2, 2, 4, 4);
    let offs = [-0.2109375f32, 0.453125, 1.546875, 2.2109375];
    for (oy, off) in offs.iter().enumerate() {
        for (ox, r) in row.iter().enumerate() {
            let g = y[oy * 4 + ox];
            assert!((g - (r + off)).abs() < 1e-6, "({oy}, {ox}): {g} vs {}", r + off);
        }
    }
}

#[test]
fn bicubic_downscale_keeps_constants() {
    let x = vec![0.5f32; 2 * 7 * 5];
    let y = bicubic(&x, 2, 7, 5, 3, 4);
    assert_eq!(y.len(), 2 * 3 * 4);
    assert!(y.iter().all(|v| (v - 0.5).abs() < 1e-6));
}
