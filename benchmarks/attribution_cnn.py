"""Attribution on the second task: a small CNN on the 8×8 digits images (``digits_cnn``).

The same harness as ``attribution_digits.py`` (our methods with default arguments and with λ tuned
on validation LDS, 1 and 5 models; peers with their defaults and tuned), on a different architecture
and split: Conv2d(1,8,3,pad 1)–ReLU–Conv2d(8,16,3)–ReLU–flatten–Linear(576,10), split seed 1,
1000 train / 200 queries / 200 validation, 20 epochs of SGD (see ``_attr_tasks.py``). Ground truth:
100 half subsets × 2 seeds, cached under ``benchmarks/.cache/gt_digits_cnn_<hash>.npz``.

Run: ``python benchmarks/attribution_cnn.py`` (same options as ``attribution_digits.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_digits import main

if __name__ == "__main__":
    main(default_task="digits_cnn")
