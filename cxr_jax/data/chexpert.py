"""The 'chexpert' dataset kind: CheXpert (Irvin et al., 2019), as distributed.

    manual_dir/ (or its one subfolder, e.g. CheXpert-v1.0-small/)
      train.csv, valid.csv
          Path, Sex, Age, Frontal/Lateral, AP/PA, then 14 observations: 1.0 positive,
          0.0 negative, -1.0 uncertain, blank not mentioned (kept as such: the uncertain-label
          policy, U-Ignore / U-Ones / U-Zeros, is the training's choice)
      train/patient00001/study1/view1_frontal.jpg ...   (Path is relative to manual_dir's
      valid/...                                           parent of the CheXpert folder)

Frontal views only (the models read frontal radiographs; laterals are counted as skipped).
valid.csv (radiologist-labelled) is the test split; train.csv's patients are split between
train and validation by a hash of the patient, so no patient is in two splits.
"""

import dataclasses
import pathlib
import re

import numpy as np

from cxr_jax.data import disk_files
from cxr_jax.data import findings as findings_lib
from cxr_jax.data import splits
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip

FINDINGS = (
  "No Finding",
  "Enlarged Cardiomediastinum",
  "Cardiomegaly",
  "Lung Opacity",
  "Lung Lesion",
  "Edema",
  "Consolidation",
  "Pneumonia",
  "Atelectasis",
  "Pneumothorax",
  "Pleural Effusion",
  "Pleural Other",
  "Fracture",
  "Support Devices",
)
CSV_SPLITS = {"train.csv": "", "valid.csv": "test"}
_PATH = re.compile(r"(patient\d+)/(study\d+)/(view\d+_\w+)\.jpg$")
EXPECTED = (
  "CheXpert as distributed: train.csv and valid.csv (Path, Sex, Age, Frontal/Lateral, AP/PA "
  "and 14 observations) beside train/ and valid/ holding patient*/study*/view*.jpg"
)


def _csv_dir(root: pathlib.Path) -> pathlib.Path:
  for folder in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
    if (folder / "train.csv").is_file() or (folder / "valid.csv").is_file():
      return folder
  raise DataError(f"No train.csv or valid.csv in {root} or its subfolders; expected {EXPECTED}.")


def find(manual_dir: str) -> str:
  return str(_csv_dir(disk_files.require_dir(manual_dir, EXPECTED)))


@dataclasses.dataclass(frozen=True)
class Row:
  id: str  # patient<n>_study<n>_view<n>_<frontal|lateral>
  image: str  # relative to the reader's root
  patient: str
  split: str  # 'test' for valid.csv, '' for train.csv
  codes: np.ndarray
  sex: str
  age: int


class ChexpertReader(disk_files.DiskReader):
  """Reads train.csv and valid.csv, and each frontal image with its 14 observation codes."""

  def __init__(self, manual_dir: str, num_examples: int = 0):
    del num_examples
    super().__init__(_csv_dir(disk_files.require_dir(manual_dir, EXPECTED)))
    self.findings = FINDINGS
    self._rows: dict[str, Row] = {}
    for csv_name, split in CSV_SPLITS.items():
      if (self.root / csv_name).is_file():
        self._read_csv(csv_name, split)

  def _read_csv(self, csv_name: str, split: str) -> None:
    path = self.root / csv_name
    laterals, absent = 0, []
    for line, row in disk_files.read_rows(path, ("Path", "Frontal/Lateral", *FINDINGS)):
      where = f"{path}, line {line}"
      match = _PATH.search(row["Path"].strip())
      if match is None:
        raise DataError(
          f"{where}: Path {row['Path']!r}; expected .../patient<n>/study<n>/view<n>_<x>.jpg."
        )
      if row["Frontal/Lateral"].strip() != "Frontal":
        laterals += 1
        continue
      image = "/".join((*pathlib.PurePosixPath(row["Path"].strip()).parts[1:],))
      if not (self.root / image).is_file():
        absent.append(image)
        continue
      codes = []
      for name in FINDINGS:
        code = findings_lib.parse_cell(row[name])
        if code is None:
          raise DataError(f"{where}: {name!r} is {row[name]!r}; expected 1.0, 0.0, -1.0 or blank.")
        codes.append(code)
      patient, study, view = match.groups()
      age = row.get("Age", "").strip()
      image_id = f"{patient}_{study}_{view}"
      self._rows[image_id] = Row(
        id=image_id,
        image=image,
        patient=patient,
        split=split,
        codes=np.array(codes, np.int8),
        sex={"Male": "M", "Female": "F"}.get(row.get("Sex", "").strip(), ""),
        age=int(float(age)) if age.replace(".", "", 1).isdigit() else -1,
      )
    if laterals:
      self.skipped.append(Skip(csv_name, "lateral views", f"{laterals} rows; frontal views only"))
    if absent:
      self.skipped.append(
        Skip(
          csv_name,
          "rows without an image",
          f"{len(absent)} rows name no file below {self.root} (first: {absent[0]})",
        )
      )

  def items(self) -> list[tuple[str, Row]]:
    return sorted(self._rows.items())

  def split_of(self, image_id: str, row: Row) -> str:
    del image_id
    return row.split or splits.train_or_validation(row.patient)

  def read(self, row: Row, skip) -> Example | None:
    image = self.read_image(row.image, skip)
    if image is None:
      return None
    no_finding = row.codes[FINDINGS.index("No Finding")] == findings_lib.POSITIVE
    return Example(
      id=row.id,
      image=image,
      mask=None,
      label=int(not no_finding),
      source="chexpert",
      sex=row.sex,
      age=row.age,
      patient=row.patient,
      findings=row.codes,
    )
