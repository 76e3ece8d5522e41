"""Finding labels as datasets store them: one int8 code per finding (numpy only).

    POSITIVE 1, NEGATIVE 0, UNCERTAIN -1 (CheXpert's -1), MISSING -2 (blank: not mentioned)

A reader names its findings (`Reader.findings`) and yields one code per finding; what
uncertain and missing codes become for training is the loss's business (`targets`).
"""

import numpy as np

POSITIVE, NEGATIVE, UNCERTAIN, MISSING = 1, 0, -1, -2
# CheXpert's policies for uncertain labels (Irvin et al., 2019): ignored, read as positive,
# or read as negative. Missing labels are always ignored.
UNCERTAIN_POLICIES = {"ignore": None, "ones": 1.0, "zeros": 0.0}

_CELL_CODES = {"1": POSITIVE, "0": NEGATIVE, "-1": UNCERTAIN, "": MISSING}


def parse_names(text: str | tuple | list) -> tuple[str, ...]:
  """config.model.findings ('Atelectasis,Effusion' or a tuple) as a tuple of names."""
  if isinstance(text, (tuple, list)):
    return tuple(str(t).strip() for t in text if str(t).strip())
  return tuple(name.strip() for name in str(text).split(",") if name.strip())


def parse_cell(value: str) -> int | None:
  """A CSV cell ('1', '1.0', '0', '0.0', '-1', '-1.0', '') as a code; None if it is none."""
  text = value.strip()
  if text.endswith(".0"):
    text = text[:-2]
  return _CELL_CODES.get(text)


def from_names(present: set[str], names: tuple[str, ...]) -> np.ndarray:
  """Codes of `names`: POSITIVE for those in `present`, NEGATIVE for the rest."""
  return np.array([POSITIVE if n in present else NEGATIVE for n in names], np.int8)


def missing(count: int) -> np.ndarray:
  return np.full(count, MISSING, np.int8)


def targets(codes: np.ndarray, uncertain: str = "ignore") -> tuple[np.ndarray, np.ndarray]:
  """(targets, weights) float32 of codes [..., N]: weight 0 where a label is missing, and
  where it is uncertain under the 'ignore' policy; uncertain -> 1 ('ones') or 0 ('zeros')."""
  if uncertain not in UNCERTAIN_POLICIES:
    raise ValueError(
      f"uncertain-label policy {uncertain!r}; valid: {', '.join(UNCERTAIN_POLICIES)}."
    )
  codes = np.asarray(codes)
  value = UNCERTAIN_POLICIES[uncertain]
  target = (codes == POSITIVE).astype(np.float32)
  weight = ((codes == POSITIVE) | (codes == NEGATIVE)).astype(np.float32)
  if value is not None:
    target = np.where(codes == UNCERTAIN, np.float32(value), target)
    weight = np.where(codes == UNCERTAIN, np.float32(1), weight)
  return target, weight
