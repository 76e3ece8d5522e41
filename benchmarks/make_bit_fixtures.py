"""Writes tests/fixtures/encoders/big_vision_bit_r50x1.{json,npz}: what big_vision's BiT computes.

big_vision's `models/bit_paper.py` (the ResNet-V2 of the public BiT-S/BiT-M `.npz` files),
built with `Model(num_classes=1000, depth=50, width=1)`: its parameter schema (name -> shape,
names '/'-joined as big_vision saves them), and for the deterministic random weights of
tests/encoder_weights.py its logits and the channel means of the five features a U-Net takes
(strides 2..32: the root convolution, blocks 1-3, ReLU(norm-pre-head(block 4))) on the fixed
grey image in R, G and B. It also writes the original big_transfer repository's names for the
same arrays (the public BiT-M-R50x1.npz's), checked here by big_vision's own converter
(`maybe_convert_big_transfer_format`) mapping them back onto the schema exactly.

big_vision is not on PyPI: clone it; its utils import TensorFlow's gfile only to read remote
files, which this script does not do, so a stand-in module replaces it.

  git clone https://github.com/google-research/big_vision /tmp/big_vision
  python benchmarks/make_bit_fixtures.py --big_vision=/tmp/big_vision
"""

import argparse
import json
import re
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import encoder_weights  # noqa: E402 (after the path it needs)


def import_bit_paper(checkout: str):
  """big_vision.models.bit_paper and big_vision.utils from a checkout, TensorFlow stood in."""
  sys.path.insert(0, checkout)
  import flax.training.checkpoints  # noqa: F401, PLC0415 (asks for TensorFlow's spec: before the stand-in)

  tf = types.ModuleType("tensorflow")
  tf.io = types.ModuleType("tensorflow.io")
  tf.io.gfile = types.ModuleType("tensorflow.io.gfile")
  sys.modules.update({"tensorflow": tf, "tensorflow.io": tf.io, "tensorflow.io.gfile": tf.io.gfile})
  from big_vision import utils  # noqa: PLC0415
  from big_vision.models import bit_paper  # noqa: PLC0415

  return bit_paper, utils


def legacy_name(name: str) -> str:
  """big_vision's name -> big_transfer's (the inverse of big_vision's converter)."""
  fixed = {
    "root_block/conv_root/kernel": "root_block/standardized_conv2d/kernel",
    "norm-pre-head/scale": "group_norm/gamma",
    "norm-pre-head/bias": "group_norm/beta",
    "head/kernel": "head/conv2d/kernel",
    "head/bias": "head/conv2d/bias",
  }
  if name in fixed:
    return "resnet/" + fixed[name]
  unit, layer, leaf = name.rsplit("/", 2)
  if layer == "conv_proj":
    return f"resnet/{unit}/a/proj/standardized_conv2d/kernel"
  group = "abc"[int(layer[-1]) - 1]
  if layer.startswith("conv"):
    return f"resnet/{unit}/{group}/standardized_conv2d/kernel"
  return f"resnet/{unit}/{group}/group_norm/{'gamma' if leaf == 'scale' else 'beta'}"


def legacy_shape(name: str, shape: list[int]) -> list[int]:
  """big_transfer's shapes: GroupNorm [C] (big_vision's [1, 1, 1, C]), the head a 1x1 conv."""
  if re.search(r"(gn\d|gn_proj|norm-pre-head)/", name):
    return [shape[-1]]
  if name == "head/kernel":
    return [1, 1, *shape]
  return shape


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--big_vision", required=True, help="a big_vision checkout")
  args = parser.parse_args()
  bit_paper, utils = import_bit_paper(args.big_vision)
  import flax  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  jax.config.update("jax_platforms", "cpu")
  name, seed = "big_vision_bit_r50x1", 0
  model = bit_paper.Model(num_classes=1000, depth=50, width=1)
  size = encoder_weights.IMAGE_SIZE
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  )
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes), sep="/")
  schema = {key: list(value.shape) for key, value in flat.items()}
  weights = encoder_weights.random_bit_weights(schema, seed)
  params = flax.traverse_util.unflatten_dict(weights, sep="/")

  # big_transfer's names, and big_vision's converter taking them back to the schema exactly.
  legacy = {legacy_name(k): [k, legacy_shape(k, s)] for k, s in schema.items()}
  legacy_arrays = {k: weights[bv].reshape(s) for k, (bv, s) in legacy.items()}
  converted = bit_paper.maybe_convert_big_transfer_format(
    utils.recover_tree(list(legacy_arrays), list(legacy_arrays.values()))
  )
  back = flax.traverse_util.flatten_dict(converted, sep="/")
  assert set(back) == set(weights), set(back) ^ set(weights)
  for key, value in back.items():
    np.testing.assert_array_equal(np.asarray(value), weights[key], err_msg=key)

  image = encoder_weights.test_image()
  x = jnp.repeat(jnp.asarray(image)[..., None], 3, axis=-1)
  (logits, out), state = model.apply(
    {"params": params},
    x,
    capture_intermediates=lambda module, method: module.name == "conv_root",
    mutable=["intermediates"],
  )
  root = state["intermediates"]["root_block"]["conv_root"]["__call__"][0]
  stages = [root] + [out[f"stage{i}"][max(out[f"stage{i}"])] for i in (1, 2, 3)]
  stages.append(out["pre_logits_2d"])
  outputs = {"logits": np.asarray(logits)}
  outputs.update({f"stage{i}": np.asarray(s.mean(axis=(1, 2))) for i, s in enumerate(stages)})
  out_dir = encoder_weights.FIXTURES
  meta = {"seed": seed, "big_vision": "models/bit_paper.py", "schema": schema, "legacy": legacy}
  (out_dir / f"{name}.json").write_text(json.dumps(meta))
  np.savez_compressed(out_dir / f"{name}.npz", **outputs)
  print(name, len(schema), "arrays", {k: v.shape for k, v in outputs.items()})


if __name__ == "__main__":
  main()
