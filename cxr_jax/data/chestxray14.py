"""The 'chestxray14' dataset kind: NIH ChestX-ray14 (Wang et al., 2017), as distributed.

    manual_dir/
      Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv)
          Image Index, Finding Labels ('|'-joined, or 'No Finding'), Follow-up #, Patient ID,
          Patient Age, Patient Gender, View Position, OriginalImage[Width, Height],
          OriginalImagePixelSpacing[x, y]
      train_val_list.txt, test_list.txt     the official split, one image name per line
      images_001/images/00000001_000.png ... (or images/): 1024 x 1024 8-bit PNGs

Splits: test_list.txt is the test split; the rest go to train and validation by a hash of
the patient, so no patient is in two splits. Without the lists, every split is by patient.
Pixel spacing is the original's scaled to the stored size (estimated).
"""

import dataclasses
import pathlib

import numpy as np

from cxr_jax.data import disk_files
from cxr_jax.data import findings as findings_lib
from cxr_jax.data import splits
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip

FINDINGS = (
  "Atelectasis",
  "Cardiomegaly",
  "Effusion",
  "Infiltration",
  "Mass",
  "Nodule",
  "Pneumonia",
  "Pneumothorax",
  "Consolidation",
  "Edema",
  "Emphysema",
  "Fibrosis",
  "Pleural_Thickening",
  "Hernia",
)
NO_FINDING = "No Finding"
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
EXPECTED = (
  "ChestX-ray14 as distributed: Data_Entry_2017.csv, train_val_list.txt, test_list.txt and "
  "the images (images_*/images/*.png or images/*.png)"
)


def find(manual_dir: str) -> str:
  root = disk_files.require_dir(manual_dir, EXPECTED)
  return str(_csv(root))


def _csv(root: pathlib.Path) -> pathlib.Path:
  for name in CSV_NAMES:
    if (root / name).is_file():
      return root / name
  raise DataError(f"No {' or '.join(CSV_NAMES)} in {root}; expected {EXPECTED}.")


def _age(text: str) -> int:
  """'58', '058Y' (the 2017 file) -> 58; anything else -> -1."""
  digits = text.strip().upper().removesuffix("Y")
  return int(digits) if digits.isdigit() else -1


@dataclasses.dataclass(frozen=True)
class Row:
  image: str
  patient: str
  codes: np.ndarray
  sex: str
  age: int
  spacing_mm: tuple[float, float]  # (row, column) of the original image
  original_size: tuple[int, int]  # (height, width); (0, 0) when unknown
  finding: str


def _float(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    return 0.0


class ChestXray14Reader(disk_files.DiskReader):
  """Reads Data_Entry_2017.csv and the official lists, and each image with its findings."""

  def __init__(self, manual_dir: str, num_examples: int = 0):
    del num_examples
    super().__init__(disk_files.require_dir(manual_dir, EXPECTED))
    self.findings = FINDINGS
    csv_path = _csv(self.root)
    files = {disk_files.stem(n) + ".png": n for n in disk_files.list_files(self.root, (".png",))}
    self._test = self._read_list("test_list.txt")
    self._rows: dict[str, Row] = {}
    absent: list[str] = []
    for line, row in disk_files.read_rows(csv_path, COLUMNS):
      name = row["Image Index"].strip()
      labels = {x.strip() for x in row["Finding Labels"].split("|")} - {NO_FINDING, ""}
      if unknown := sorted(labels - set(FINDINGS)):
        self.skipped.append(
          Skip(csv_path.name, "unknown finding", f"line {line}: {unknown}; expected {FINDINGS}")
        )
        continue
      if name not in files:
        absent.append(name)
        continue
      self._rows[disk_files.stem(name)] = Row(
        image=files[name],
        patient=row["Patient ID"].strip(),
        codes=findings_lib.from_names(labels, FINDINGS),
        sex=row.get("Patient Gender", "").strip().upper()[:1],
        age=_age(row.get("Patient Age", "")),
        spacing_mm=(_float(row.get("y]", "")), _float(row.get("OriginalImagePixelSpacing[x", ""))),
        original_size=(
          int(_float(row.get("Height]", ""))),
          int(_float(row.get("OriginalImage[Width", ""))),
        ),
        finding=row["Finding Labels"].strip(),
      )
    if absent:  # a partial download: one line, not one per row
      self.skipped.append(
        Skip(
          csv_path.name,
          "rows without an image",
          f"{len(absent)} rows name no image found "
          f"below {self.root} (first: {absent[0]}); download the other images_*.tar.gz",
        )
      )
    listed = set(files.values())
    named = {r.image for r in self._rows.values()}
    for name in sorted(listed - named):
      self.skipped.append(Skip(name, "image not in the CSV", f"no row in {csv_path.name}"))

  def _read_list(self, name: str) -> set[str] | None:
    path = self.root / name
    if not path.is_file():
      return None
    return {disk_files.stem(line.strip()) for line in path.read_text().splitlines() if line.strip()}

  def items(self) -> list[tuple[str, Row]]:
    return sorted(self._rows.items())

  def split_of(self, image_id: str, row: Row) -> str:
    """test_list.txt's images test; the rest split by patient."""
    if self._test is None:
      return splits.split_of(row.patient)
    return "test" if image_id in self._test else splits.train_or_validation(row.patient)

  def read(self, row: Row, skip) -> Example | None:
    image = self.read_image(row.image, skip)
    if image is None:
      return None
    spacing, estimated = (0.0, 0.0), False
    if min(row.spacing_mm) > 0 and min(row.original_size) > 0:
      scale = (row.original_size[0] / image.shape[0], row.original_size[1] / image.shape[1])
      spacing = (row.spacing_mm[0] * scale[0], row.spacing_mm[1] * scale[1])
      estimated = image.shape != row.original_size
    return Example(
      id=disk_files.stem(row.image),
      image=image,
      mask=None,
      label=int(bool(row.codes.any())),
      source="chestxray14",
      spacing_mm=spacing,
      spacing_estimated=estimated,
      sex=row.sex,
      age=row.age,
      finding=row.finding,
      patient=row.patient,
      findings=row.codes,
    )
