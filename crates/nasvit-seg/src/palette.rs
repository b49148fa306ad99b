//! Class colours and names of the known sets, for label PNGs (the palette of a palette PNG) and overlays.
//!
//! - `cityscapes`: the 19 train ids, colours of cityscapesScripts' `labels.py`;
//! - `ade20k`: the 150 classes with mmsegmentation's palette (`mmseg/datasets/ade.py`, Apache-2.0; it gives
//!   `[140, 140, 140]` to both `road` and `stairs`: kept, so images match mmseg's);
//! - `voc`: PASCAL VOC's bit-shuffled colormap (`VOCdevkit`'s `labelcolormap.m`), defined for all 256 ids
//!   (255, the ignore label, is the familiar cream `[224, 224, 192]`);
//! - `generated(n)`: any number of classes, hues a golden angle apart so neighbouring ids differ.

/// One colour per class id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Palette {
    colors: Vec<[u8; 3]>,
}

impl Palette {
    pub fn new(colors: Vec<[u8; 3]>) -> Self {
        Self { colors }
    }

    pub fn cityscapes() -> Self {
        Self::new(CITYSCAPES_COLORS.to_vec())
    }

    pub fn ade20k() -> Self {
        Self::new(ADE20K_COLORS.to_vec())
    }

    /// The VOC colormap of all 256 ids (the 21 classes, then the same rule on, up to 255).
    pub fn voc() -> Self {
        Self::new((0..=255u8).map(voc_color).collect())
    }

    /// `n` colours: hue steps of the golden angle, alternating value and saturation; id 0 is black as in VOC
    /// (a background class reads as "nothing" in an overlay).
    pub fn generated(n: usize) -> Self {
        let colors = (0..n)
            .map(|i| {
                if i == 0 {
                    return [0, 0, 0];
                }
                let hue = (i as f64 * 0.618_033_988_749_895).fract();
                let (s, v) = match i % 3 {
                    0 => (0.65, 0.95),
                    1 => (0.9, 0.8),
                    _ => (0.75, 0.65),
                };
                hsv(hue, s, v)
            })
            .collect();
        Self::new(colors)
    }

    /// `cityscapes`, `ade20k`, `voc`, or `generated` (with `n` colours).
    pub fn by_name(name: &str, n: usize) -> Option<Self> {
        match name {
            "cityscapes" => Some(Self::cityscapes()),
            "ade20k" => Some(Self::ade20k()),
            "voc" => Some(Self::voc()),
            "generated" => Some(Self::generated(n)),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.colors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.colors.is_empty()
    }

    /// The colour of class `id`, if the palette has one.
    pub fn color(&self, id: u8) -> Option<[u8; 3]> {
        self.colors.get(usize::from(id)).copied()
    }

    /// A full 256-entry PLTE chunk: this palette's colours, the VOC colours for the ids past its end (so 255 is
    /// VOC's ignore colour), since an index past the PLTE end is an error for strict PNG readers.
    pub fn plte(&self) -> Vec<u8> {
        (0..=255u8)
            .flat_map(|i| self.color(i).unwrap_or_else(|| voc_color(i)))
            .collect()
    }
}

/// VOC's colormap: the bits of the id, three at a time, go to the high bits of R, G and B.
pub fn voc_color(id: u8) -> [u8; 3] {
    let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
    let mut c = id;
    for j in 0..8 {
        r |= (c & 1) << (7 - j);
        g |= ((c >> 1) & 1) << (7 - j);
        b |= ((c >> 2) & 1) << (7 - j);
        c >>= 3;
    }
    [r, g, b]
}

fn hsv(h: f64, s: f64, v: f64) -> [u8; 3] {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i as i64 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r, g, b].map(|x| (x * 255.0).round() as u8)
}

/// Cityscapes' 19 evaluation classes, in train-id order.
#[rustfmt::skip]
pub const CITYSCAPES_CLASSES: [&str; 19] = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
];

#[rustfmt::skip]
pub const CITYSCAPES_COLORS: [[u8; 3]; 19] = [
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153], [250, 170, 30],
    [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142],
    [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
];

/// PASCAL VOC 2012's 21 classes (background first), as VOC-format tools write them.
#[rustfmt::skip]
pub const VOC_CLASSES: [&str; 21] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
];

/// ADE20K's 150 classes (SceneParsing, `objectInfo150`), as mmsegmentation names them.
#[rustfmt::skip]
pub const ADE20K_CLASSES: [&str; 150] = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
];

#[rustfmt::skip]
pub const ADE20K_COLORS: [[u8; 3]; 150] = [
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80], [140, 140, 140], [204, 5, 255],
    [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82],
    [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
    [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255], [8, 255, 214], [7, 255, 224],
    [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255], [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
    [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
    [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0], [153, 255, 0], [0, 0, 255],
    [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255], [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255],
    [0, 255, 112], [0, 255, 133], [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
    [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
    [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20], [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255],
    [255, 0, 204], [0, 255, 194], [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
    [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0],
    [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255], [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112],
    [92, 255, 0], [0, 224, 255], [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255], [255, 0, 122], [255, 245, 0],
    [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255], [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204],
    [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255], [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
    [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voc_colormap_matches_the_published_colours() {
        // VOC2012's devkit: background, aeroplane, bicycle, ..., person (15), tvmonitor (20), void (255)
        assert_eq!(voc_color(0), [0, 0, 0]);
        assert_eq!(voc_color(1), [128, 0, 0]);
        assert_eq!(voc_color(2), [0, 128, 0]);
        assert_eq!(voc_color(3), [128, 128, 0]);
        assert_eq!(voc_color(8), [64, 0, 0]);
        assert_eq!(voc_color(15), [192, 128, 128]);
        assert_eq!(voc_color(20), [0, 64, 128]);
        assert_eq!(voc_color(255), [224, 224, 192]);
    }

    #[test]
    fn known_palettes_have_one_colour_per_class() {
        assert_eq!(Palette::cityscapes().len(), CITYSCAPES_CLASSES.len());
        assert_eq!(Palette::ade20k().len(), ADE20K_CLASSES.len());
        assert_eq!(Palette::voc().len(), 256);
        assert_eq!(Palette::ade20k().color(0), Some([120, 120, 120]));
        assert_eq!(Palette::ade20k().color(149), Some([92, 0, 255]));
        assert_eq!(Palette::cityscapes().color(13), Some([0, 0, 142]));
        assert_eq!(Palette::cityscapes().color(19), None);
        assert_eq!(ADE20K_CLASSES[7], "bed");
        assert_eq!(ADE20K_CLASSES[149], "flag");
    }

    #[test]
    fn generated_palette_is_distinct_and_plte_is_full() {
        let p = Palette::generated(150);
        let mut colors: Vec<[u8; 3]> = (0..150).map(|i| p.color(i).unwrap()).collect();
        assert_eq!(colors[0], [0, 0, 0]);
        colors.sort();
        colors.dedup();
        assert_eq!(colors.len(), 150);
        let plte = Palette::cityscapes().plte();
        assert_eq!(plte.len(), 768);
        assert_eq!(&plte[..3], &[128, 64, 128]);
        assert_eq!(&plte[765..], &[224, 224, 192]);
    }
}
