"""PyTorch-layout weights (torchvision, timm, TorchXRayVision) -> a model's Flax variables.

The encoders (resnet.py, densenet.py) carry torchvision's attribute names, so a state-dict
key names its Flax path: 'layer1.0.conv1.weight' -> ('encoder', 'layer1', 0, 'conv1',
'kernel'). Tensors change layout (conv OIHW -> HWIO, linear [out, in] -> [in, out]) and
BatchNorm's names (weight/bias/running_mean/running_var -> scale/bias/mean/var). The ImageNet
head (fc / classifier) loads into a classifier's `head` when the shapes agree.

big_vision's BiT ResNet-V2 `.npz` files load into the `bit_r*` encoders (bit.py): names with
'/' ('block1/unit01/conv1/kernel', under 'params/' in a big_vision training checkpoint) or the
original big_transfer repository's ('resnet/block1/unit01/a/standardized_conv2d/kernel', the
public BiT-S/BiT-M files), kernels already HWIO, GroupNorm's [1, 1, 1, C] scales flattened.

Files: `.safetensors` (read without torch), `.npz` (arrays under the state dict's keys),
`.pth` / `.pt` (torch.load, when torch is installed). Local paths or gs:// (etils.epath).
"""

import dataclasses
import io
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx

from cxr_jax import errors

HEAD_KEYS = ("fc.", "classifier.")  # torchvision/timm ResNet, torchvision/TorchXRayVision DenseNet
BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
# TorchXRayVision's models take grey pixels in [-1024, 1024]: theirs are the state dicts
# whose first convolution has 1 input channel (torchvision's and timm's have 3).
FIRST_CONVS = ("features.conv0.weight", "conv1.weight")
XRV_INPUT_SCALE = 512.0  # z-scored pixels -> about XRV's range (std ~ a quarter of it)
# torchvision's old DenseNet checkpoints: 'denselayer1.norm.1.weight' for 'norm1.weight'.
_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:.+))$")


@dataclasses.dataclass
class LoadReport:
  """What a conversion did: source key -> Flax path loaded, paths left, keys unused."""

  loaded: dict[str, str]
  left_at_init: list[str]
  unused: list[str]
  notes: list[str]

  def summary(self) -> str:
    """A few lines for the log: counts, then the names of what was left and unused."""
    lines = [
      f"loaded {len(self.loaded)} arrays, left {len(self.left_at_init)} at initialisation, "
      f"{len(self.unused)} unused",
      *self.notes,
    ]
    if self.left_at_init:
      lines.append("left at initialisation: " + ", ".join(self.left_at_init))
    if self.unused:
      lines.append("unused: " + ", ".join(self.unused))
    return "\n".join(lines)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict as numpy arrays, from .safetensors, .npz, .pth or .pt (local or gs://)."""
  file = epath.Path(path)
  if not file.exists():
    raise FileNotFoundError(f"config.model.init_from={path!r} does not exist.")
  suffix = file.suffix.lower()
  if suffix == ".safetensors":
    return dict(safetensors.numpy.load(file.read_bytes()))
  if suffix == ".npz":
    with np.load(io.BytesIO(file.read_bytes())) as arrays:
      return {key: arrays[key] for key in arrays.files}
  if suffix in (".pth", ".pt"):
    try:
      import torch  # noqa: PLC0415 (optional, heavy: only to read pickled state dicts)
    except ImportError:
      raise errors.ConfigError(
        f"config.model.init_from={path!r} is a PyTorch pickle and torch is not installed; "
        f"install torch (CPU wheel) or convert it to .safetensors."
      ) from None
    state = torch.load(io.BytesIO(file.read_bytes()), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
  raise errors.ConfigError(
    f"config.model.init_from={path!r}: unknown format {suffix!r}; use a .safetensors, .npz, "
    f".pth or .pt state dict, or a cxr_jax run directory."
  )


def input_scale_for(state_dict: Mapping[str, np.ndarray]) -> float:
  """config.model.input_scale for weights trained on these inputs (TorchXRayVision: 512)."""
  for key, value in state_dict.items():
    if key.removeprefix("module.").removeprefix("model.") in FIRST_CONVS:
      return XRV_INPUT_SCALE if np.shape(value)[1] == 1 else 1.0
  return 1.0


def flax_path(key: str, array: np.ndarray, head: str | None) -> tuple[Any, ...] | None:
  """The Flax path of a state-dict key (None: no place for it in this model)."""
  key = key.removeprefix("module.")  # saved from DataParallel
  key = key.removeprefix("model.")  # TorchXRayVision's ResNet wraps torchvision's as .model
  key = _OLD_DENSENET.sub(lambda m: m.group(1) + m.group(2).replace(".", "", 1), key)
  parts = key.split(".")
  if any(key.startswith(prefix) for prefix in HEAD_KEYS):
    if head is None:
      return None
    owner: tuple[Any, ...] = (head,)
  else:
    owner = ("encoder", *(int(p) if p.isdigit() else p for p in parts[:-1]))
  leaf = parts[-1]
  if leaf == "weight" and array.ndim >= 2:
    return (*owner, "kernel")
  if leaf in BN_NAMES:
    return (*owner, BN_NAMES[leaf])
  return None


def is_big_vision(state_dict: Mapping[str, Any]) -> bool:
  """Whether the names are big_vision's or big_transfer's ('/'-separated), not PyTorch's."""
  return any("/" in key for key in state_dict)


_LEGACY_BIT = {
  "root_block/standardized_conv2d/kernel": "root_block/conv_root/kernel",
  "group_norm/gamma": "norm-pre-head/scale",
  "group_norm/beta": "norm-pre-head/bias",
  "head/conv2d/kernel": "head/kernel",
  "head/conv2d/bias": "head/bias",
}
_LEGACY_BIT_UNIT = re.compile(
  r"(block\d+/unit\d+)/([abc])/(proj/)?(standardized_conv2d/kernel|group_norm/gamma|group_norm/beta)"
)


def big_vision_name(key: str) -> str:
  """A BiT name in big_vision's bit_paper layout: 'params/' dropped, big_transfer's renamed
  ('resnet/block1/unit01/a/group_norm/gamma' -> 'block1/unit01/gn1/scale'), as big_vision's
  maybe_convert_big_transfer_format does. Names it does not know come back unchanged."""
  key = key.removeprefix("params/")
  if not key.startswith("resnet/"):
    return key
  rest = re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", key.removeprefix("resnet/"))
  if rest in _LEGACY_BIT:
    return _LEGACY_BIT[rest]
  match = _LEGACY_BIT_UNIT.fullmatch(rest)
  if not match:
    return key
  unit, group, proj, leaf = match.groups()
  i = "abc".index(group) + 1
  if proj:
    return f"{unit}/conv_proj/kernel"
  if leaf.startswith("standardized_conv2d"):
    return f"{unit}/conv{i}/kernel"
  return f"{unit}/gn{i}/{'scale' if leaf.endswith('gamma') else 'bias'}"


def bit_path(key: str, head: str | None) -> tuple[Any, ...] | None:
  """The Flax path of a big_vision / big_transfer BiT name (None: no place for it)."""
  parts = big_vision_name(key).split("/")
  if parts[0] == "head":
    return None if head is None else (head, parts[-1])
  if parts[0] == "norm-pre-head":
    parts[0] = "norm_pre_head"
  if parts[-1] not in ("kernel", "scale", "bias"):
    return None
  return ("encoder", *parts)


def to_flax_layout(array: np.ndarray) -> np.ndarray:
  """OIHW conv kernels -> HWIO, [out, in] linear weights -> [in, out]."""
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    return array.T
  return array


def convert(
  state_dict: Mapping[str, np.ndarray], targets: Mapping[tuple[Any, ...], tuple[int, ...]]
) -> tuple[dict[tuple[Any, ...], np.ndarray], LoadReport]:
  """Maps a PyTorch state dict or a BiT .npz onto `targets` (Flax path -> shape of the
  model's variable).

  PyTorch's RGB first convolutions become grey ones (summed over the input channels, as grey
  = the same value in R, G and B; BiT's keeps its RGB kernel, see bit.py). A head of another
  shape (1000 ImageNet classes into 2) is reported unused. Raises ConfigError on any other
  shape mismatch, naming both shapes.
  """
  head = None
  if len(targets.get(("head", "kernel"), ())) == 2:
    head = "head"
  elif ("class_head", "kernel") in targets:
    head = "class_head"
  big_vision = is_big_vision(state_dict)
  arrays, loaded, unused, notes = {}, {}, [], []
  if big_vision:
    notes.append(
      "big_vision BiT layout: the root convolution keeps its RGB kernel; grey images see the "
      "sum of its standardised channels (the RGB model on a grey image)"
    )
  for key, value in state_dict.items():
    value = np.asarray(value, np.float32)
    path = bit_path(key, head) if big_vision else flax_path(key, value, head)
    if path is None or path not in targets:
      if not key.endswith("num_batches_tracked"):  # PyTorch's BatchNorm step counter
        unused.append(key)
      continue
    want = tuple(targets[path])
    if big_vision:
      if len(want) == 1:  # GroupNorm's [1, 1, 1, C]
        value = value.reshape(-1)
      elif len(want) == 2 and value.ndim == 4 and value.shape[:2] == (1, 1):  # a 1x1 conv head
        value = value[0, 0]
    else:
      value = to_flax_layout(value)
    if value.ndim == 4 and value.shape[2] == 3 and want[2] == 1 and value.shape[:2] == want[:2]:
      value = value.sum(axis=2, keepdims=True)
      notes.append(f"{key}: RGB kernel summed over its 3 input channels for grey images")
    if value.shape != want and path[0] == head:
      unused.append(key)
      notes.append(f"{key}: a head of shape {value.shape}, the model's is {want}: not loaded")
      continue
    if value.shape != want:
      raise errors.ConfigError(
        f"config.model.init_from: {key} has shape {value.shape} (in Flax's layout) but the "
        f"model's {'.'.join(map(str, path))} has shape {want}; pick the config.model.encoder "
        f"these weights were trained with."
      )
    arrays[path] = value
    loaded[key] = ".".join(map(str, path))
  left = sorted(".".join(map(str, p)) for p in targets if p not in arrays)
  return arrays, LoadReport(loaded, left, unused, notes)


def target_shapes(*states: nnx.State) -> dict[tuple[Any, ...], tuple[int, ...]]:
  """Flax path -> shape over the variables of `states` (params, batch statistics)."""
  shapes = {}
  for state in states:
    for path, variable in nnx.to_flat_state(state):
      value = variable.get_value() if hasattr(variable, "get_value") else variable.value
      if hasattr(value, "shape") and value.ndim:
        shapes[tuple(path)] = tuple(value.shape)
  return shapes


def replace(state: nnx.State, arrays: Mapping[tuple[Any, ...], np.ndarray]) -> nnx.State:
  """A copy of `state` whose variables at the paths in `arrays` hold those values."""
  flat = []
  for path, variable in nnx.to_flat_state(state):
    if tuple(path) in arrays:
      old = variable.get_value()
      variable = variable.replace(np.asarray(arrays[tuple(path)], old.dtype))
    flat.append((path, variable))
  return nnx.from_flat_state(flat)
