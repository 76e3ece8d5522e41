"""The 'jsrt' dataset kind: the JSRT chest X-rays with the SCR outlines of lungs, heart and
clavicles, as distributed.

    manual_dir/ (any layout below it)
      JPCLN001.IMG ... JPCLN154.IMG   154 images with a lung nodule (JSRT)
      JPCNN001.IMG ... JPCNN093.IMG   93 without
                                      2048 x 2048, 12 bits in big-endian 16-bit words, no
                                      header, 0.175 mm pixels, film density (high = dark)
      .../masks/left lung/JPCLN001.gif, right lung/, heart/, left clavicle/, right clavicle/
                                      SCR (van Ginneken et al., 2006): 1024 x 1024, 0/255,
                                      in fold1/ and fold2/ as distributed

The images are stored at the masks' 1024 x 1024 (2 x 2 means, 0.35 mm pixels) and inverted
so bone is bright. An image without SCR outlines is kept without masks.
"""

import pathlib

import numpy as np

from cxr_jax.data import disk_files
from cxr_jax.data import findings as findings_lib
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip

SIDE = 2048  # pixels of a JSRT .IMG
BITS = 12
SPACING_MM = 0.175
SCALE = 2  # JSRT 2048 -> SCR 1024
# SCR's folder of each outline -> (structure, side): a structure is both sides' union.
SCR_FOLDERS = {
  "left lung": "lungs",
  "right lung": "lungs",
  "heart": "heart",
  "left clavicle": "clavicles",
  "right clavicle": "clavicles",
}
FINDINGS = ("Nodule",)
EXPECTED = (
  "the JSRT images (JPCLN*.IMG, JPCNN*.IMG: 2048x2048 12-bit big-endian raw) and, optionally, "
  "the SCR masks (masks/left lung/JPCLN001.gif, ...)"
)


def find(manual_dir: str) -> str:
  root = disk_files.require_dir(manual_dir, EXPECTED)
  if not any(root.rglob("JPC[LN]N*.IMG")) and not any(root.rglob("JPC[LN]N*.img")):
    raise DataError(f"No JSRT images (JPCLN*.IMG, JPCNN*.IMG) in {root}; expected {EXPECTED}.")
  return str(root)


def read_img(data: bytes) -> np.ndarray:
  """A JSRT .IMG's bytes -> [2048, 2048] uint16 (12-bit values); ValueError when the size is
  not 2048 x 2048 x 2 bytes."""
  if len(data) != SIDE * SIDE * 2:
    raise ValueError(f"{len(data)} bytes; a JSRT image has {SIDE}x{SIDE}x2 = {SIDE * SIDE * 2}")
  return np.frombuffer(data, dtype=">u2").reshape(SIDE, SIDE).astype(np.uint16)


def to_display(raw: np.ndarray) -> np.ndarray:
  """12-bit film density [2048, 2048] -> 8-bit grey [1024, 1024], bone bright: 2 x 2 means,
  inverted, the image's own range stretched to 0..255."""
  mean = raw.astype(np.float64).reshape(SIDE // SCALE, SCALE, SIDE // SCALE, SCALE).mean((1, 3))
  inverted = (2**BITS - 1) - np.clip(mean, 0, 2**BITS - 1)
  lo, hi = float(inverted.min()), float(inverted.max())
  if hi <= lo:
    return np.zeros(inverted.shape, np.uint8)
  return np.round((inverted - lo) * (255.0 / (hi - lo))).astype(np.uint8)


class JsrtReader(disk_files.DiskReader):
  """Lists the .IMG files and the SCR outlines; reads an image with its structures."""

  def __init__(self, manual_dir: str, num_examples: int = 0):
    del num_examples
    super().__init__(pathlib.Path(find(manual_dir)))
    self.findings = FINDINGS
    self._images: dict[str, str] = {}
    self._outlines: dict[str, dict[str, str]] = {}  # id -> SCR folder -> file
    for name in disk_files.list_files(self.root, (".img", ".gif")):
      stem, parts = disk_files.stem(name), name.split("/")
      if name.lower().endswith(".img"):
        if not (stem.startswith(("JPCLN", "JPCNN")) and stem[5:].isdigit()):
          self.skipped.append(Skip(name, "unrecognised name", "expected JPCLN<n>.IMG / JPCNN<n>"))
        elif stem in self._images:
          self.skipped.append(Skip(name, "duplicate id", f"already read from {self._images[stem]}"))
        else:
          self._images[stem] = name
      elif len(parts) >= 2 and parts[-2].lower() in SCR_FOLDERS:
        folder = parts[-2].lower()
        seen = self._outlines.setdefault(stem, {})
        if folder in seen:  # SCR's fold1/ and fold2/ hold each image once
          self.skipped.append(Skip(name, "duplicate mask", f"using {seen[folder]}"))
        else:
          seen[folder] = name
    for stem in sorted(set(self._outlines) - set(self._images)):
      for name in self._outlines.pop(stem).values():
        self.skipped.append(Skip(name, "mask without an image", f"no {stem}.IMG"))

  def items(self) -> list[tuple[str, str]]:
    return sorted(self._images.items())

  def read(self, file: str, skip) -> Example | None:
    image_id = disk_files.stem(file)
    try:
      image = to_display(read_img(disk_files.read_bytes(self.root / file)))
    except ValueError as e:
      skip(Skip(file, "unreadable image", str(e)))
      return None
    outlined: dict[str, np.ndarray] = {}
    folders = self._outlines.get(image_id, {})
    for folder, structure in SCR_FOLDERS.items():
      if folder not in folders:
        continue
      mask = self.read_mask(folders[folder], image.shape, image_id, skip)
      if mask is not None:
        outlined[structure] = outlined.get(structure, 0) | mask
    for structure in set(outlined):
      sides = [f for f, s in SCR_FOLDERS.items() if s == structure]
      if missing := [f for f in sides if f not in folders]:
        skip(
          Skip(
            folders[sides[0]] if sides[0] in folders else file,
            "outline incomplete",
            f"no {', '.join(missing)} for {image_id}; its {structure} left out",
          )
        )
        del outlined[structure]
    nodule = image_id.startswith("JPCLN")
    return Example(
      id=image_id,
      image=image,
      mask=outlined.pop("lungs", None),
      label=int(nodule),
      source="jsrt",
      spacing_mm=(SPACING_MM * SCALE, SPACING_MM * SCALE),
      patient=image_id,  # one image per patient
      structures={k: np.asarray(v, np.uint8) for k, v in outlined.items()},
      findings=findings_lib.from_names({"Nodule"} if nodule else set(), FINDINGS),
    )
