"""Extract the UCI optical handwritten digits (8x8) into ``digits.npz`` beside this file.

    python -m venv /tmp/extract && /tmp/extract/bin/pip install scikit-learn
    /tmp/extract/bin/python workers/tasks/data/extract_digits.py

scikit-learn ships a copy of the test set of the UCI "Optical Recognition of Handwritten
Digits" data (Alpaydin & Kaynak, 1998; https://doi.org/10.24432/C50P49, CC BY 4.0): 1,797
images of 8x8 integer pixels in 0..16, classes 0..9. It is needed only to run this script,
never at run time. The file written holds, with ``allow_pickle=False``:

    images    uint8 (1797, 8, 8)   pixel counts 0..16, in scikit-learn's order
    labels    uint8 (1797,)        digit 0..9
    held_out  bool  (1797,)        the fixed evaluation split (below)

Held-out split, a rule with no random numbers so it can be re-derived from the images
alone: within each class, in file order, the examples numbered 4, 9, 14, ... (every fifth,
starting from the fifth) are held out: 355 images, 34 to 36 per class; 1,442 remain for
training.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def held_out_mask(labels: np.ndarray) -> np.ndarray:
    """Every fifth example of each class (numbers 4, 9, 14, ... within the class)."""
    mask = np.zeros(labels.size, dtype=bool)
    for digit in range(10):
        (positions,) = np.nonzero(labels == digit)
        mask[positions[4::5]] = True
    return mask


def main() -> int:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images
    if images.shape != (1797, 8, 8) or images.min() < 0 or images.max() > 16:
        raise SystemExit(f"unexpected digits data: shape {images.shape}, range {images.min()}..{images.max()}")
    if not np.array_equal(images, np.round(images)):
        raise SystemExit("unexpected digits data: pixels are not integers")
    images = images.astype(np.uint8)
    labels = bunch.target.astype(np.uint8)
    held_out = held_out_mask(labels)
    target = HERE / "digits.npz"
    np.savez_compressed(target, images=images, labels=labels, held_out=held_out)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    print(f"wrote {target}: {labels.size} images, {held_out.sum()} held out; sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
