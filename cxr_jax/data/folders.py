"""The 'folders' dataset kind: a researcher's own folder of images and masks.

    manual_dir/
      images/<stem>.png|.jpg|.jpeg  any size and bit depth (subfolders allowed, stems unique)
      masks/<stem>.png              optional, per image, same height and width: binary (0/255
                                    or 0/1: the lungs) or, with label_map.json, a label map
      label_map.json                optional: mask value -> structure, e.g. {"1": "lungs",
                                    "2": "lungs", "3": "heart", "4": "clavicles"}
      labels.csv                    optional: `id` (an image's stem), then one column per
                                    finding (1 positive, 0 negative, -1 uncertain, blank
                                    unknown); optional columns `patient` (splits keep a
                                    patient's images together), `spacing_mm` (pixel size) and
                                    `split` (train | validation | test, fixed by you)

An image is 'abnormal' when any finding is positive. Files that cannot be used are skipped,
counted and named with what was expected (strict mode raises instead); a malformed
labels.csv or label_map.json stops the build with the line at fault.
"""

import io
import json
import math
import pathlib

import numpy as np
from PIL import Image

from cxr_jax.data import disk_files
from cxr_jax.data import findings as findings_lib
from cxr_jax.data import splits
from cxr_jax.data.images import IMAGE_SUFFIXES
from cxr_jax.data.records import STRUCTURES
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip

EXPECTED = (
  "a folder holding images/ (PNG/JPEG) and optionally masks/ with the same stems, "
  "labels.csv (id, one column per finding) and label_map.json"
)
RESERVED_COLUMNS = ("id", "patient", "spacing_mm", "split")
SPLITS = ("train", "validation", "test")


def find(manual_dir: str) -> str:
  """Where the folders are; raises `DataError` saying what was expected."""
  root = disk_files.require_dir(manual_dir, EXPECTED)
  if not (root / "images").is_dir():
    raise DataError(f"No images/ folder in {root}; expected {EXPECTED}.")
  return str(root)


def read_label_map(path: pathlib.Path) -> dict[int, str]:
  """label_map.json as {mask value: structure}; a `DataError` naming what is wrong."""
  try:
    raw = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not a JSON object ({e}); expected e.g. {{'1': 'lungs'}}.") from e
  label_map = {}
  for key, name in raw.items() if isinstance(raw, dict) else [(None, raw)]:
    if (
      not (isinstance(key, str) and key.isdigit() and 0 < int(key) < 256) or name not in STRUCTURES
    ):
      raise DataError(
        f"{path}: entry {key!r}: {name!r}; expected mask values 1..255 mapped to one of "
        f"{list(STRUCTURES)}, e.g. {{'1': 'lungs', '2': 'heart'}}."
      )
    label_map[int(key)] = name
  return label_map


def _mask_values(data: bytes) -> np.ndarray:
  """A mask file's stored values [H, W] (a palette image's indices, not its colours)."""
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
      image = image.convert("L")
    return np.asarray(image).astype(np.int64)


class FoldersReader(disk_files.DiskReader):
  """Lists images/, masks/ and labels.csv, and reads each image with its mask and labels."""

  def __init__(self, manual_dir: str, num_examples: int = 0):
    del num_examples  # the folder decides
    super().__init__(pathlib.Path(find(manual_dir)))
    self._images: dict[str, str] = {}
    for name in disk_files.list_files(self.root / "images", IMAGE_SUFFIXES):
      stem = disk_files.stem(name)
      if stem in self._images:
        self.skipped.append(
          Skip(f"images/{name}", "duplicate id", f"{stem} already read from {self._images[stem]}")
        )
      else:
        self._images[stem] = f"images/{name}"
    self._masks: dict[str, str] = {}
    if (self.root / "masks").is_dir():
      for name in disk_files.list_files(self.root / "masks", IMAGE_SUFFIXES):
        stem, file = disk_files.stem(name), f"masks/{name}"
        if stem not in self._images:
          self.skipped.append(Skip(file, "mask without an image", f"no images/{stem}.*"))
        elif stem in self._masks:
          self.skipped.append(
            Skip(file, "duplicate mask", f"for {stem}, using {self._masks[stem]}")
          )
        else:
          self._masks[stem] = file
    label_map_path = self.root / "label_map.json"
    self._label_map = read_label_map(label_map_path) if label_map_path.exists() else {}
    self.findings: tuple[str, ...] = ()
    self._rows: dict[str, dict] = {}
    if (self.root / "labels.csv").exists():
      self._read_labels(self.root / "labels.csv")

  def _read_labels(self, path: pathlib.Path) -> None:
    rows = disk_files.read_rows(path, ("id",))
    for line, row in rows:
      if not self.findings:
        self.findings = tuple(c for c in row if c not in RESERVED_COLUMNS and c)
      image_id = row["id"].strip()
      where = f"{path}, line {line}"
      if image_id not in self._images:
        self.skipped.append(
          Skip("labels.csv", "id without an image", f"line {line}: no images/{image_id}.*")
        )
        continue
      codes = []
      for name in self.findings:
        code = findings_lib.parse_cell(row.get(name, ""))
        if code is None:
          raise DataError(
            f"{where}: column {name!r} is {row[name]!r}; expected 1, 0, -1 (uncertain) or "
            "blank (unknown)."
          )
        codes.append(code)
      split = row.get("split", "").strip()
      if split and split not in SPLITS:
        raise DataError(f"{where}: split {split!r}; expected one of {', '.join(SPLITS)} or blank.")
      spacing = row.get("spacing_mm", "").strip()
      try:
        spacing_mm = float(spacing) if spacing else 0.0
      except ValueError:
        spacing_mm = -1.0
      if not (math.isfinite(spacing_mm) and spacing_mm >= 0):
        raise DataError(f"{where}: spacing_mm {spacing!r}; expected a pixel size in mm (> 0).")
      self._rows[image_id] = {
        "codes": np.array(codes, np.int8),
        "patient": row.get("patient", "").strip(),
        "split": split,
        "spacing_mm": spacing_mm,
      }

  def items(self) -> list[tuple[str, str]]:
    return sorted(self._images.items())

  def split_of(self, image_id: str, file: str) -> str:
    """The CSV's split, else a hash of the patient (when named), else of the id."""
    del file
    row = self._rows.get(image_id, {})
    return row.get("split") or splits.split_of(row.get("patient") or image_id)

  def read(self, file: str, skip) -> Example | None:
    image_id = disk_files.stem(file)
    image = self.read_image(file, skip)
    if image is None:
      if image_id in self._masks:
        skip(Skip(self._masks[image_id], "its image was skipped"))
      return None
    outlined = self._read_outlines(image_id, image.shape, skip)
    row = self._rows.get(image_id)
    codes = None if row is None else row["codes"]
    spacing = row["spacing_mm"] if row else 0.0
    return Example(
      id=image_id,
      image=image,
      mask=outlined.pop("lungs", None),
      label=int(codes is not None and bool((codes == findings_lib.POSITIVE).any())),
      source="folders",
      spacing_mm=(spacing, spacing),
      patient=row["patient"] if row else "",
      structures=outlined,
      findings=codes,
    )

  def _read_outlines(self, image_id: str, shape, skip) -> dict[str, np.ndarray]:
    """{structure: 0/1 mask} of an image's mask file (none, or {} after `skip`)."""
    file = self._masks.get(image_id)
    if file is None:
      return {}
    if not self._label_map:
      mask = self.read_mask(file, shape, image_id, skip)
      if mask is not None and not mask.any():
        skip(Skip(file, "empty mask", f"nothing > 127 (or 1); {image_id} kept without a mask"))
        return {}
      return {} if mask is None else {"lungs": mask}
    kept = f"{image_id} kept without its mask"
    try:
      values = _mask_values(disk_files.read_bytes(self.root / file))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
      skip(Skip(file, "unreadable mask", f"{e}; {kept}"))
      return {}
    if values.shape != tuple(shape):
      skip(Skip(file, "mask size differs", disk_files.size_detail(values.shape, shape, kept)))
      return {}
    outside = sorted(set(np.unique(values).tolist()) - {0, *self._label_map})
    if outside:
      skip(
        Skip(
          file,
          "values outside the label map",
          f"values {outside[:8]} are not 0 or in label_map.json {self._label_map}; {kept}",
        )
      )
      return {}
    outlined = {}
    for name in dict.fromkeys(self._label_map.values()):
      members = [v for v, n in self._label_map.items() if n == name]
      outlined[name] = np.isin(values, members).astype(np.uint8)
    if "lungs" in outlined and not outlined["lungs"].any():
      del outlined["lungs"]  # an image whose lungs are not outlined trains no lung mask
    return outlined
