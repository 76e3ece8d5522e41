"""The 'covid_qu_ex' dataset kind: COVID-QU-Ex (Tahir et al., 2021; Qatar University), as
distributed on Kaggle.

    manual_dir/ (any folders above it)
      Lung Segmentation Data/Lung Segmentation Data/
        Train/ | Val/ | Test/                  the official splits (kept as they are)
          COVID-19/ | Non-COVID/ | Normal/     the three classes
            images/<name>.png                  256 x 256
            lung masks/<name>.png              0/255
      Infection Segmentation Data/...          the same layout for a COVID subset (with
                                               infection masks): not read, its images are
                                               copies of the lung set's

'Normal' is normal, the other two classes abnormal; both are findings (one-hot). The
distribution names no patients, so images are split as the authors split them.
"""

import pathlib

from cxr_jax.data import disk_files
from cxr_jax.data import findings as findings_lib
from cxr_jax.data.images import IMAGE_SUFFIXES
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip

SPLITS = {"Train": "train", "Val": "validation", "Test": "test"}
CLASSES = ("COVID-19", "Non-COVID", "Normal")
FINDINGS = ("COVID-19", "Non-COVID")
PREFERRED_TREE = "Lung Segmentation Data"
EXPECTED = (
  "COVID-QU-Ex as distributed: 'Lung Segmentation Data/' holding Train/, Val/, Test/, each "
  "with COVID-19/, Non-COVID/, Normal/ and in those images/ and 'lung masks/'"
)


def _entry(name: str) -> tuple[str, str, str, str, str] | None:
  """(tree, split, class, folder, file) of a path '.../<Split>/<Class>/<folder>/<file>'."""
  parts = name.split("/")
  if len(parts) < 4 or parts[-4] not in SPLITS or parts[-3] not in CLASSES:
    return None
  return "/".join(parts[:-4]), parts[-4], parts[-3], parts[-2], parts[-1]


def _trees(root: pathlib.Path) -> dict[str, list]:
  trees: dict[str, list] = {}
  for name in disk_files.list_files(root, IMAGE_SUFFIXES):
    entry = _entry(name)
    if entry is not None:
      trees.setdefault(entry[0], []).append((name, *entry[1:]))
  return trees


def _choose(trees: dict[str, list]) -> str:
  def preference(tree: str) -> tuple[bool, int, str]:
    return (PREFERRED_TREE not in tree, tree.count("/"), tree)

  return sorted(trees, key=preference)[0]


def find(manual_dir: str) -> str:
  root = disk_files.require_dir(manual_dir, EXPECTED)
  if not root.is_dir() or not any((p / c).is_dir() for p in root.rglob("Train") for c in CLASSES):
    raise DataError(f"No COVID-QU-Ex tree in {root}; expected {EXPECTED}.")
  return str(root)


class CovidQuExReader(disk_files.DiskReader):
  """Lists one COVID-QU-Ex tree (the lung set, when several are there) and reads its images."""

  def __init__(self, manual_dir: str, num_examples: int = 0):
    del num_examples
    super().__init__(pathlib.Path(find(manual_dir)))
    self.findings = FINDINGS
    trees = _trees(self.root)
    if not trees:
      raise DataError(
        f"No images in {self.root}/.../<Train|Val|Test>/<class>/; expected {EXPECTED}."
      )
    self.tree = _choose(trees)
    self._images: dict[str, tuple[str, str, str]] = {}  # id -> (file, split, class)
    masks: dict[tuple[str, str, str], str] = {}
    for name, split, label, folder, file in trees[self.tree]:
      stem = disk_files.stem(file)
      if folder == "images":
        if stem in self._images:
          self.skipped.append(
            Skip(name, "duplicate id", f"already read from {self._images[stem][0]}")
          )
        else:
          self._images[stem] = (name, split, label)
      elif folder == "lung masks":
        masks[(split, label, stem)] = name
    self._masks = {}
    for (split, label, stem), name in sorted(masks.items()):
      if self._images.get(stem, ("", "", ""))[1:] != (split, label):
        self.skipped.append(
          Skip(name, "mask without an image", f"no {split}/{label}/images/{stem}.*")
        )
      else:
        self._masks[stem] = name
    self.ignored = sorted(set(trees) - {self.tree})

  def describe(self) -> str:
    return str(self.root / self.tree)

  def items(self) -> list[tuple[str, tuple[str, str, str]]]:
    return sorted(self._images.items())

  def split_of(self, image_id: str, handle: tuple[str, str, str]) -> str:
    del image_id
    return SPLITS[handle[1]]

  def read(self, handle: tuple[str, str, str], skip) -> Example | None:
    file, _, label = handle
    image_id = disk_files.stem(file)
    image = self.read_image(file, skip)
    if image is None:
      return None
    mask = None
    if image_id in self._masks:
      mask = self.read_mask(self._masks[image_id], image.shape, image_id, skip)
    return Example(
      id=image_id,
      image=image,
      mask=mask if mask is not None and mask.any() else None,
      label=int(label != "Normal"),
      source="covid_qu_ex",
      finding=label,
      findings=findings_lib.from_names({label}, FINDINGS),
    )
