"""Measuring attribution quality on a small proxy of your own problem.

Attribution scores cannot be checked by looking at them. The standard checks retrain the model many
times and compare (Park et al. 2023, "TRAK"; Koh & Liang 2017 for mislabel detection):

- :func:`lds`: the linear datamodeling score. Retrain on random subsets of the training set; an
  attribution method predicts each retrained model's output on a query as the sum of the scores of
  the examples it was trained on; LDS is the Spearman correlation between predictions and outputs.
- :func:`mislabel_auroc` and :func:`mislabel_detection_curve`: flip some training labels, rank the
  training examples by self-influence, and measure how early the flipped ones come.
- :func:`subset_retraining` builds the retraining ground truth for small models, all models at once
  (``torch.func.stack_module_state`` + ``vmap``), with :func:`random_subsets` choosing the subsets.

Pure PyTorch (metrics from ``torchmetrics``); no Lightning. ``examples/evaluate_attribution.py``
shows the whole loop with the :class:`~lightning_sketch.callbacks.GradientSketch` callback and
:class:`~lightning_sketch.attribution.Attributor`.
"""

from lightning_sketch.evaluation.metrics import lds, mislabel_auroc, mislabel_detection_curve
from lightning_sketch.evaluation.retraining import random_subsets, subset_retraining, train_subsets

__all__ = [
    "lds",
    "mislabel_auroc",
    "mislabel_detection_curve",
    "random_subsets",
    "subset_retraining",
    "train_subsets",
]
