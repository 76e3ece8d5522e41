"""Fold ensembles: several runs' models predicting as one (nnU-Net predicts with all its folds).

`Ensemble` takes the members' `Inference`s and answers as one: every probability (p(lung),
p(abnormal), structures, findings) is the mean over the members, and the lungs'
`uncertainty` is the binary entropy of that mean. The entropy of the mean is the members'
mean entropy plus their disagreement (the mutual information between the prediction and
which member made it), so masks the folds disagree on score as more uncertain than any one
fold says, and mask QC flags them.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from cxr_jax import errors
from cxr_jax.core.inference.inference import Inference
from cxr_jax.core.inference.inference import uncertainty

# The outputs averaged over the members (the others, e.g. attention maps, are not combined).
MEAN_KEYS = ("prob", "p_abnormal", "p_structures", "p_findings")


class Ensemble:
  """Members' `Inference`s as one: `__call__(images)` -> the mean probabilities (and the
  uncertainty of the mean p(lung)); the attributes prediction reads are the members'."""

  def __init__(self, members: Sequence[Inference], names: Sequence[str]):
    if len(members) < 2:
      raise errors.ConfigError("an ensemble needs at least two runs.")
    first = members[0]
    for member, name in zip(members[1:], names[1:], strict=True):
      for what in ("image_size", "tta", "segments", "classifies"):
        if getattr(member, what) != getattr(first, what):
          raise errors.ConfigError(
            f"the ensemble's runs differ in {what}: {names[0]} has "
            f"{getattr(first, what)!r}, {name} {getattr(member, what)!r}; ensemble runs of "
            "one recipe (e.g. a sweep's folds)."
          )
      if [h.output for h in member.heads] != [h.output for h in first.heads]:
        raise errors.ConfigError(
          f"the ensemble's runs have different heads: {names[0]} and {name}."
        )
    self.members, self.names = list(members), list(names)
    self.config = first.config
    self.image_size, self.tta, self.heads = first.image_size, first.tta, first.heads
    self.segments, self.classifies = first.segments, first.classifies
    self.qc_threshold = float(np.mean([m.qc_threshold for m in members]))
    self.batch_size = min(m.batch_size for m in members)

  def __call__(self, images: np.ndarray) -> dict:
    combined = combine([member(images) for member in self.members])
    return {key: np.asarray(value) for key, value in combined.items()}


def combine(outputs: Sequence[dict]) -> dict:
  """The members' outputs as one: MEAN_KEYS averaged, and the uncertainty of the mean p(lung)
  (numpy or traced arrays alike: `Ensemble` and an exported ensemble share it)."""
  mean = {
    key: jnp.mean(jnp.stack([out[key] for out in outputs]), axis=0)
    for key in MEAN_KEYS
    if key in outputs[0]
  }
  if "prob" in mean:
    mean["uncertainty"] = uncertainty(mean["prob"])
  return mean
