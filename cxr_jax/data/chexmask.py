"""The 'chexmask' dataset kind: CheXmask (Gaggion et al., 2024) lung and heart masks over the
images of another dataset, as distributed on PhysioNet.

    manual_dir/
      <any folder>/ChestX-Ray8.csv | CheXpert.csv | MIMIC-CXR-JPG.csv | Padchest.csv |
                   VinDr-CXR.csv      (OriginalResolution/ as distributed: masks at the
                                       image's own size)
          <id column>, Dice RCA (Mean), Dice RCA (Max), Landmarks, Left Lung, Right Lung,
          Heart, Height, Width
      the images those CSVs name, anywhere below manual_dir (found by the id as a relative
      path, else by file name, else by stem)

The id column is the source dataset's: Image Index (ChestX-ray8), Path (CheXpert),
dicom_id (MIMIC-CXR), ImageID (PadChest), image_id (VinDr-CXR). Masks are run-length
encoded as the dataset's own reader (DataPostprocessing/utils.py, get_mask_from_RLE)
defines: 'start length' pairs, starts counted from 1, over the row-major (C order)
flattening of a Height x Width mask. CSV rows are found by byte offset and read one at a
time, so memory stays flat over the 676k rows.
"""

import csv
import dataclasses
import pathlib
import re

import numpy as np

from cxr_jax.data import disk_files
from cxr_jax.data import splits
from cxr_jax.data.images import IMAGE_SUFFIXES
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip

ID_COLUMNS = ("Image Index", "Path", "dicom_id", "ImageID", "image_id")
MASK_COLUMNS = ("Left Lung", "Right Lung", "Heart", "Height", "Width")
EXPECTED = (
  "a CheXmask CSV (columns: an id column such as 'Image Index' or 'Path', then Left Lung, "
  "Right Lung, Heart, Height, Width) and the images it names, below manual_dir"
)
_PATIENT = {  # id column -> the patient in an id
  "Image Index": re.compile(r"^(\d+)_\d+"),  # ChestX-ray8: 00000001_000.png
  "Path": re.compile(r"(patient\d+)"),  # CheXpert: .../patient00001/study1/...
}


def decode_rle(rle: str, height: int, width: int) -> np.ndarray:
  """CheXmask's RLE -> [height, width] uint8 0/1 (see the module docstring); ValueError when
  the runs do not fit."""
  runs = np.array(rle.split(), dtype=np.int64)
  if runs.size % 2:
    raise ValueError(f"{runs.size} numbers; expected 'start length' pairs")
  starts, lengths = runs[0::2] - 1, runs[1::2]
  if runs.size and (
    starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > height * width
  ):
    raise ValueError(f"runs outside a {height}x{width} mask")
  flat = np.zeros(height * width + 1, np.int32)
  np.add.at(flat, starts, 1)
  np.add.at(flat, starts + lengths, -1)
  return (np.cumsum(flat[:-1]) > 0).astype(np.uint8).reshape(height, width)


def _first_field(line: bytes) -> str:
  """A CSV line's first field (quoted or not), without parsing the rest."""
  if line.startswith(b'"'):
    return next(csv.reader([line.decode("utf-8")]), [""])[0].strip()
  return line.split(b",", 1)[0].decode("utf-8").strip()


def _csvs(root: pathlib.Path) -> list[str]:
  found = []
  for name in disk_files.list_files(root, (".csv",)):
    with open(root / name, newline="", encoding="utf-8-sig") as f:
      header = next(csv.reader([f.readline()]), [])
    if all(c in header for c in MASK_COLUMNS) and any(c in header for c in ID_COLUMNS):
      found.append(name)
  return found


def find(manual_dir: str) -> str:
  root = disk_files.require_dir(manual_dir, EXPECTED)
  if not _csvs(root):
    raise DataError(f"No CheXmask CSV in {root}; expected {EXPECTED}.")
  return str(root)


@dataclasses.dataclass(frozen=True)
class Row:
  id: str
  csv: str  # relative to the root
  offset: int  # byte offset of the row's line
  line: int
  image: str  # relative to the root
  patient: str


class ChexmaskReader(disk_files.DiskReader):
  """Indexes the CSVs' rows (id -> byte offset) and the images; decodes a row's masks."""

  def __init__(self, manual_dir: str, num_examples: int = 0):
    del num_examples
    super().__init__(pathlib.Path(find(manual_dir)))
    self.csvs = _csvs(self.root)
    files = disk_files.list_files(self.root, IMAGE_SUFFIXES)
    by_path = set(files)
    by_name: dict[str, str] = {}
    by_stem: dict[str, str] = {}
    for name in files:
      by_name.setdefault(name.rsplit("/", 1)[-1], name)
      by_stem.setdefault(disk_files.stem(name), name)
    self._rows: dict[str, Row] = {}
    self._headers: dict[str, list[str]] = {}
    for csv_name in self.csvs:
      self._index(csv_name, by_path, by_name, by_stem)

  def _index(self, csv_name: str, by_path, by_name, by_stem) -> None:
    absent, first = 0, ""
    with open(self.root / csv_name, "rb") as f:
      header = next(csv.reader([f.readline().decode("utf-8-sig")]))
      self._headers[csv_name] = header
      id_column = header[0]
      if id_column not in ID_COLUMNS:
        raise DataError(
          f"{self.root / csv_name}: first column {id_column!r}; CheXmask CSVs start with the "
          f"image's id, one of {', '.join(ID_COLUMNS)}."
        )
      position, line = f.tell(), 1
      for raw in iter(f.readline, b""):
        line += 1
        offset, position = position, position + len(raw)
        key = _first_field(raw)  # the RLE fields stay unparsed until the row is read
        if not key:
          continue
        image = key if key in by_path else None
        parts = key.split("/")
        for candidate in ("/".join(parts[i:]) for i in range(1, len(parts))):
          image = image or (candidate if candidate in by_path else None)
        image = image or by_name.get(parts[-1]) or by_stem.get(disk_files.stem(key))
        if image is None:
          absent, first = absent + 1, first or key
          continue
        image_id = disk_files.stem(key) if id_column != "Path" else "_".join(parts[-3:])[:-4]
        if image_id in self._rows:
          self.skipped.append(Skip(csv_name, "duplicate id", f"line {line}: {image_id}"))
          continue
        match = _PATIENT.get(id_column) and _PATIENT[id_column].search(key)
        patient = match.group(1) if match else ""
        self._rows[image_id] = Row(image_id, csv_name, offset, line, image, patient)
    if absent:
      self.skipped.append(
        Skip(
          csv_name,
          "rows without an image",
          f"{absent} rows name no image below {self.root} (first: {first})",
        )
      )

  def items(self) -> list[tuple[str, Row]]:
    return sorted(self._rows.items())

  def split_of(self, image_id: str, row: Row) -> str:
    return splits.split_of(row.patient or image_id)

  def _fields(self, row: Row) -> dict[str, str]:
    with open(self.root / row.csv, "rb") as f:
      f.seek(row.offset)
      values = next(csv.reader([f.readline().decode("utf-8")]))
    return dict(zip(self._headers[row.csv], values, strict=False))

  def read(self, row: Row, skip) -> Example | None:
    image = self.read_image(row.image, skip)
    if image is None:
      return None
    fields = self._fields(row)
    kept = "kept without masks"
    outlined = {}
    try:
      height, width = int(float(fields["Height"])), int(float(fields["Width"]))
      if (height, width) != image.shape:
        raise ValueError(
          f"masks are {height}x{width} but the image is {image.shape[0]}x{image.shape[1]} (a "
          "Preprocessed/ CSV? use OriginalResolution/)"
        )
      left, right = (decode_rle(fields[c], height, width) for c in ("Left Lung", "Right Lung"))
      outlined = {"lungs": left | right, "heart": decode_rle(fields["Heart"], height, width)}
    except (ValueError, KeyError) as e:
      skip(Skip(row.csv, "unusable masks", f"line {row.line}: {e}; {kept}"))
    return Example(
      id=row.id,
      image=image,
      mask=outlined.pop("lungs", None),
      label=0,  # CheXmask labels anatomy only
      source="chexmask",
      patient=row.patient,
      structures=outlined,
    )
