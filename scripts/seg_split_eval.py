#!/usr/bin/env python3
"""mIoU of a generated segmentation set's validation images split by the number of item classes in each ground
truth (<= 1 or 2), one confusion matrix per group, and the share of items recognised: of the ground truth's item
regions (one per class present in an image), those whose pixels the prediction labels mostly (among item classes)
with the right class (docs/results.md, issue 15: where the errors are).

    nasvit seg infer --model RUN --out PRED DATA/JPEGImages/val_*.png
    python3 scripts/seg_split_eval.py PRED DATA/SegmentationClassPNG

Reads 8-bit grey or palette PNGs (the class ids) with zlib only; 11 classes (background + Fashion-MNIST).
"""
import glob, os, sys
import numpy as np
import zlib, struct
def read(p):
    """An 8-bit grey or palette PNG's values as an (h, w) int64 array."""
    d = open(p, 'rb').read(); i = 8; idat = b''
    while i < len(d):
        n, = struct.unpack('>I', d[i:i+4]); t = d[i+4:i+8]; c = d[i+8:i+8+n]; i += 12 + n
        if t == b'IHDR': w, h, bd, ct = struct.unpack('>IIBB', c[:10]); assert bd == 8 and ct in (0, 3), (bd, ct)
        if t == b'IDAT': idat += c
    raw = zlib.decompress(idat); out = np.zeros((h, w), np.int64); prev = np.zeros(w, np.int64)
    for y in range(h):
        f = raw[y*(w+1)]; r = np.frombuffer(raw[y*(w+1)+1:(y+1)*(w+1)], np.uint8).astype(np.int64); cur = np.zeros(w, np.int64)
        for x in range(w):
            a = cur[x-1] if x else 0; b = prev[x]; cc = prev[x-1] if x else 0
            if f == 0: v = r[x]
            elif f == 1: v = r[x] + a
            elif f == 2: v = r[x] + b
            elif f == 3: v = r[x] + (a + b) // 2
            else:
                pa, pb, pc = abs(b - cc), abs(a - cc), abs(a + b - 2*cc)
                v = r[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else cc)
            cur[x] = v & 255
        out[y] = cur; prev = cur
    return out


def main():
    pred_dir, gt_dir = sys.argv[1], sys.argv[2]
    K = 11
    mats = {1: np.zeros((K, K), np.int64), 2: np.zeros((K, K), np.int64)}
    regions = recognised = 0
    for gt_p in sorted(glob.glob(f'{gt_dir}/val_*.png')):
        stem = os.path.basename(gt_p)[:-4]
        g = read(gt_p).ravel(); p = read(f'{pred_dir}/{stem}.png').ravel()
        n = len(set(np.unique(g)) - {0, 255})
        m = mats[1 if n <= 1 else 2]
        ok = g != 255
        np.add.at(m, (g[ok], p[ok]), 1)
        for c in set(np.unique(g)) - {0, 255}:
            votes = np.bincount(p[g == c], minlength=K)
            votes[0] = 0
            regions += 1
            recognised += votes.argmax() == c
    for n, m in mats.items():
        tp = np.diag(m); iou = tp / np.maximum(m.sum(0) + m.sum(1) - tp, 1)
        print(('one item class' if n == 1 else 'two item classes'), 'pixels', m.sum(), 'mIoU %.2f' % (100 * iou.mean()), 'aAcc %.2f' % (100 * tp.sum() / m.sum()))
    print('items recognised (majority vote per class region): %d of %d, %.1f %%' % (recognised, regions, 100 * recognised / max(regions, 1)))


if __name__ == '__main__':
    main()
