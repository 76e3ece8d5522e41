"""Deterministic random state dicts for the encoder fixtures (tests/fixtures/encoders).

benchmarks/make_encoder_fixtures.py fills the real torchvision / timm / TorchXRayVision
modules with these weights and saves their outputs; the tests rebuild the same weights from
the committed schema (key -> shape) without torch and compare the converted Flax model's
outputs with those.
"""

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "encoders"
# fixture name -> (config.model.encoder, number of head outputs, input channels)
MODELS = {
  "torchvision_resnet18": ("resnet18", 1000, 3),
  "torchvision_resnet34": ("resnet34", 1000, 3),
  "torchvision_resnet50": ("resnet50", 1000, 3),
  "torchvision_densenet121": ("densenet121", 1000, 3),
  "timm_resnet34": ("resnet34", 1000, 3),
  "torchxrayvision_densenet121": ("densenet121", 18, 1),
}
# big_vision's BiT (benchmarks/make_bit_fixtures.py): fixture -> (encoder, head outputs)
BIT_MODELS = {"big_vision_bit_r50x1": ("bit_r50x1", 1000)}
IMAGE_SIZE = 64


def load_schema(name: str) -> dict[str, list[int]]:
  """The committed state-dict schema (key -> shape) of fixture `name`."""
  return json.loads((FIXTURES / f"{name}.json").read_text())["schema"]


def random_state_dict(schema: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
  """Weights for `schema` that keep a deep network's activations O(1): He-scaled kernels,
  BatchNorm scales in [0.2, 0.5] (residual sums stay small), running variances in [0.5, 1.5]."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in schema.items():
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
      state[key] = np.zeros(shape, np.int64)
      continue
    if leaf == "weight" and len(shape) >= 2:
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif leaf == "weight":
      value = rng.uniform(0.2, 0.5, shape)
    elif leaf == "running_var":
      value = rng.uniform(0.5, 1.5, shape)
    else:  # biases, running means
      value = 0.1 * rng.standard_normal(shape)
    state[key] = value.astype(np.float32)
  return state


def random_bit_weights(schema: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
  """Weights for a big_vision BiT schema ('block1/unit01/conv1/kernel': [1, 1, 64, 64]):
  normal kernels (standardised by the model), GroupNorm scales in [0.2, 0.5] and biases
  ~0.1, a head scaled by 1/sqrt(fan-in)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in schema.items():
    if key == "head/kernel":
      value = rng.standard_normal(shape) / np.sqrt(shape[0])
    elif key.endswith("/kernel"):
      value = rng.standard_normal(shape)
    elif key.endswith("/scale"):
      value = rng.uniform(0.2, 0.5, shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    state[key] = value.astype(np.float32)
  return state


def test_image(seed: int = 0) -> np.ndarray:
  """The grey input [2, IMAGE_SIZE, IMAGE_SIZE] every fixture was computed on."""
  return np.random.default_rng(seed).standard_normal((2, IMAGE_SIZE, IMAGE_SIZE), np.float32)
