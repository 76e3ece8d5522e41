"""Small replicas of public chest X-ray datasets, written in their distributed layouts (file
names, CSV headers, value conventions), for the readers' tests. Nothing of the real data:
drawn ellipses and made-up ids."""

import csv
import pathlib

import numpy as np
from PIL import Image


def draw_chest(height: int, width: int, seed: int) -> dict[str, np.ndarray]:
  """An X-ray-like image and its structures: {'image' uint8, 'lungs', 'heart', 'clavicles'
  (0/1 uint8)}, shapes jittered by `seed`."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:height, :width]
  y, x = (rows + 0.5) / height, (cols + 0.5) / width
  jitter = rng.uniform(-0.03, 0.03, 4)

  def ellipse(cy, cx, ry, rx):
    return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.uint8)

  lungs = ellipse(0.5 + jitter[0], 0.3 + jitter[1], 0.32, 0.15) | ellipse(
    0.5 + jitter[0], 0.7 + jitter[2], 0.32, 0.15
  )
  heart = ellipse(0.62 + jitter[3], 0.52, 0.14, 0.16) * (1 - lungs)
  clavicles = ((np.abs(y - 0.2 - 0.15 * np.abs(x - 0.5)) < 0.02) & (np.abs(x - 0.5) > 0.08)).astype(
    np.uint8
  )
  image = 170 - 110 * lungs + 40 * heart + 60 * clavicles + rng.integers(0, 20, (height, width))
  return {
    "image": np.clip(image, 0, 255).astype(np.uint8),
    "lungs": lungs,
    "heart": heart.astype(np.uint8),
    "clavicles": clavicles,
  }


def png(array: np.ndarray, path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def write_csv(path: pathlib.Path, header: list[str], rows: list[list]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


# ----- your own folders -----


def write_folders(root: pathlib.Path, count: int = 24, size=(48, 40)) -> dict[str, dict]:
  """images/ + masks/ (0/255) + labels.csv with two findings and patients; returns the drawn
  chests by id."""
  chests, rows = {}, []
  for i in range(count):
    image_id = f"case_{i:03d}"
    chest = draw_chest(*size, seed=i)
    png(chest["image"], root / "images" / f"{image_id}.png")
    png(chest["lungs"] * 255, root / "masks" / f"{image_id}.png")
    rows.append([image_id, i % 2, "" if i % 3 else -1, f"p{i // 2}", 0.5])
    chests[image_id] = chest
  write_csv(root / "labels.csv", ["id", "Effusion", "Nodule", "patient", "spacing_mm"], rows)
  return chests


# ----- JSRT + SCR -----


def jsrt_img(display: np.ndarray) -> bytes:
  """A 2048 x 2048 display image (bone bright) as a JSRT .IMG: 12-bit film density (high =
  dark), big-endian 16-bit words, no header."""
  density = (4095 - display.astype(np.int64) * 16).clip(0, 4095).astype(">u2")
  return density.tobytes()


# Ids whose hashes fill train, validation and test; the last is written without outlines.
JSRT_IDS = ("JPCLN001", "JPCLN002", "JPCLN011", "JPCNN001", "JPCNN003")


def write_jsrt(root: pathlib.Path, ids=JSRT_IDS) -> dict:
  """JSRT .IMGs in All247images/ and SCR masks (fold1/ and fold2/, 1024 px GIFs, every
  structure; the last id without outlines). Returns the chests (at 1024) by id."""
  chests = {}
  for k, image_id in enumerate(ids):
    chest = draw_chest(1024, 1024, seed=100 + k)
    display = np.kron(chest["image"], np.ones((2, 2), np.uint8))
    (root / "All247images").mkdir(parents=True, exist_ok=True)
    (root / "All247images" / f"{image_id}.IMG").write_bytes(jsrt_img(display))
    chests[image_id] = chest
    if k == len(ids) - 1:
      continue
    fold = root / "scr" / f"fold{k % 2 + 1}" / "masks"
    half = np.zeros((1024, 1024), bool)
    half[:, 512:] = True  # the image's right half: the patient's left
    sides = {
      "right lung": chest["lungs"] * ~half,
      "left lung": chest["lungs"] * half,
      "heart": chest["heart"],
      "right clavicle": chest["clavicles"] * ~half,
      "left clavicle": chest["clavicles"] * half,
    }
    for folder, mask in sides.items():
      (fold / folder).mkdir(parents=True, exist_ok=True)
      Image.fromarray((mask * 255).astype(np.uint8)).save(fold / folder / f"{image_id}.gif")
  return chests


# ----- COVID-QU-Ex -----


def write_covid_qu_ex(root: pathlib.Path, per_class: int = 2) -> dict[str, tuple[str, str]]:
  """Both trees (lung and infection sets) with Train/Val/Test x three classes; returns
  id -> (split folder, class) of the lung set."""
  truth = {}
  names = {"COVID-19": "covid_{}", "Non-COVID": "non_COVID ({})", "Normal": "Normal ({})"}
  for tree in ("Lung Segmentation Data", "Infection Segmentation Data"):
    base = root / tree / tree
    for s, split in enumerate(("Train", "Val", "Test")):
      for c, (label, pattern) in enumerate(names.items()):
        for i in range(per_class):
          image_id = pattern.format(100 * s + 10 * c + i + 1)
          chest = draw_chest(32, 32, seed=s * 100 + c * 10 + i)
          png(chest["image"], base / split / label / "images" / f"{image_id}.png")
          png(chest["lungs"] * 255, base / split / label / "lung masks" / f"{image_id}.png")
          if tree.startswith("Lung"):
            truth[image_id] = (split, label, chest["lungs"])
  return truth


# ----- CheXmask (RLE over ChestX-ray8 images) -----


def chexmask_rle(mask: np.ndarray) -> str:
  """The dataset's own encoder (DataPostprocessing/utils.py, get_RLE_from_mask), written out
  again: row-major runs of ones as 'start length', starts counted from 1."""
  pixels = np.concatenate([[0], mask.astype(np.int64).flatten(), [0]])
  runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
  runs[1::2] -= runs[::2]
  return " ".join(str(x) for x in runs)


CHEXMASK_HEADER = [
  "Image Index",
  "Dice RCA (Mean)",
  "Dice RCA (Max)",
  "Landmarks",
  "Left Lung",
  "Right Lung",
  "Heart",
  "Height",
  "Width",
]


def write_chexmask(root: pathlib.Path, patients: int = 6, per_patient: int = 2) -> dict:
  """OriginalResolution/ChestX-Ray8.csv and images_001/images/<id>.png; returns chests by id."""
  chests, rows = {}, []
  for p in range(patients):
    for f in range(per_patient):
      image_id = f"{p + 1:08d}_{f:03d}"
      chest = draw_chest(36, 44, seed=1000 + p * 10 + f)
      png(chest["image"], root / "images_001" / "images" / f"{image_id}.png")
      left, right = chest["lungs"].copy(), chest["lungs"].copy()
      left[:, :22], right[:, 22:] = 0, 0
      landmarks = "[[1, 2], [3, 4]]"  # a quoted field with commas, as in the real CSV
      rows.append(
        [
          f"{image_id}.png",
          0.9,
          0.95,
          landmarks,
          chexmask_rle(left),
          chexmask_rle(right),
          chexmask_rle(chest["heart"]),
          36,
          44,
        ]
      )
      chests[image_id] = chest
  rows.append(["99999999_000.png", 0.9, 0.9, "[]", "1 3", "", "", 36, 44])  # image absent
  write_csv(root / "OriginalResolution" / "ChestX-Ray8.csv", CHEXMASK_HEADER, rows)
  return chests


# ----- ChestX-ray14 -----

NIH_HEADER = [
  "Image Index",
  "Finding Labels",
  "Follow-up #",
  "Patient ID",
  "Patient Age",
  "Patient Gender",
  "View Position",
  "OriginalImage[Width",
  "Height]",
  "OriginalImagePixelSpacing[x",
  "y]",
  "",
]


def write_chestxray14(root: pathlib.Path, patients: int = 30) -> dict[str, tuple[str, str]]:
  """Data_Entry_2017.csv, the two lists (patients 1-6 in test) and images_00k/images/;
  returns id -> (patient, Finding Labels)."""
  truth, rows = {}, []
  labels = ["No Finding", "Cardiomegaly", "Effusion|Infiltration", "Hernia", "Mass|Nodule|Edema"]
  test, train_val = [], []
  for p in range(1, patients + 1):
    for f in range(1 + p % 3):
      name = f"{p:08d}_{f:03d}.png"
      finding = labels[(p + f) % len(labels)]
      folder = f"images_{1 + p % 2:03d}/images"
      png(draw_chest(32, 32, seed=p * 7 + f)["image"], root / folder / name)
      rows.append([name, finding, f, p, 40 + p, "MF"[p % 2], "PA", 2500, 2048, 0.143, 0.143, ""])
      (test if p <= 6 else train_val).append(name)
      truth[name[:-4]] = (str(p), finding)
  write_csv(root / "Data_Entry_2017.csv", NIH_HEADER, rows)
  (root / "test_list.txt").write_text("\n".join(test) + "\n")
  (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
  return truth


# ----- CheXpert -----

CHEXPERT_OBSERVATIONS = [
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
]


def write_chexpert(root: pathlib.Path, train_patients: int = 12) -> dict[str, list[str]]:
  """CheXpert-v1.0-small/{train,valid}.csv with 1.0/0.0/-1.0/blank cells and the JPEGs (a
  lateral view per study, left out by the reader); returns id -> the cells as written."""
  base = root / "CheXpert-v1.0-small"
  header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
  truth = {}
  cells = ["1.0", "0.0", "-1.0", ""]
  for csv_name, first, count in (("train", 1, train_patients), ("valid", 64541, 3)):
    rows = []
    for p in range(first, first + count):
      for study in (1, 2):
        for view, side in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
          rel = f"{csv_name}/patient{p:05d}/study{study}/{view}.jpg"
          (base / rel).parent.mkdir(parents=True, exist_ok=True)
          Image.fromarray(draw_chest(32, 28, seed=p + study)["image"]).save(base / rel)
          obs = [cells[(p + study + k) % 4] for k in range(len(CHEXPERT_OBSERVATIONS))]
          rows.append([f"CheXpert-v1.0-small/{rel}", "Female", 50 + p % 30, side, "PA", *obs])
          if side == "Frontal":
            truth[f"patient{p:05d}_study{study}_{view}"] = obs
    write_csv(base / f"{csv_name}.csv", header, rows)
  return truth
