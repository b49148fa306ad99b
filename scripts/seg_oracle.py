#!/usr/bin/env python3
"""The mIoU ceiling a stride-S prediction has on a segmentation set (docs/results.md, issue 15): each
validation mask as one-hot, averaged over S x S cells (what a perfect classifier at stride S could say), upsampled
bilinearly (align_corners false, as the SegFormer head's logits are) and arg-maxed; one confusion matrix over the
set, the mmsegmentation rules (label 255 ignored, a class with union 0 left out of the mean). A perfect
recogniser of every item still loses this much at the item outlines.

    python3 scripts/seg_oracle.py DATA [STRIDE=4] [CLASSES=11]

DATA is a VOC-layout set (`nasvit seg data make`): ImageSets/Segmentation/val.txt, SegmentationClassPNG/*.png.
"""
import sys

import numpy as np

from seg_split_eval import read


def upsample_weights(n, s):
    """(n * s, n) matrix of the bilinear taps, align_corners false: source = (o + 0.5) / s - 0.5, clamped."""
    m = np.zeros((n * s, n))
    for o in range(n * s):
        src = max((o + 0.5) / s - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n - 1)
        i1 = min(i0 + 1, n - 1)
        lam = src - i0
        m[o, i0] += 1 - lam
        m[o, i1] += lam
    return m


def oracle(mask, classes, s):
    h, w = mask.shape
    assert h % s == 0 and w % s == 0, (h, w, s)
    onehot = np.zeros((classes, h, w))
    ok = mask != 255
    for c in range(classes):
        onehot[c] = (mask == c)
    cells = onehot.reshape(classes, h // s, s, w // s, s).mean(axis=(2, 4))
    up = np.einsum('yi,cij,xj->cyx', upsample_weights(h // s, s), cells, upsample_weights(w // s, s))
    return up.argmax(0), ok


def main():
    root = sys.argv[1]
    s = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    k = int(sys.argv[3]) if len(sys.argv) > 3 else 11
    stems = open(f'{root}/ImageSets/Segmentation/val.txt').read().split()
    cm = np.zeros((k, k), np.int64)
    for stem in stems:
        g = read(f'{root}/SegmentationClassPNG/{stem}.png')
        p, ok = oracle(g, k, s)
        np.add.at(cm, (g[ok], p[ok]), 1)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    print(f'{len(stems)} images, stride {s}: mIoU ceiling {100 * np.nanmean(iou):.2f} %')
    print('per class IoU %:', ' '.join(f'{100 * v:.1f}' for v in iou))


if __name__ == '__main__':
    main()
