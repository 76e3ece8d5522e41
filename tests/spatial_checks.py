"""`python -m tests.spatial_checks` on 4 (forced) CPU devices: the same computations with the
image height split over the mesh's `space` axis and without. Prints one JSON object of
largest differences (and facts about the compiled programs) for tests/test_spatial.py.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import unet as unet_config
from cxr_jax.core import models
from cxr_jax.core.inference import inference as inference_lib
from cxr_jax.core.run import platform
from cxr_jax.core.run import sharding
from cxr_jax.core.training import steps


def _config(size: int):
  config = unet_config.get_config("smoke")
  config.data.image_size = size
  config.batch_size = 4
  return config


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def forward_backward(space: int) -> dict:
  """Model output, its gradients and the batch-norm statistics, train mode."""
  config = _config(64)
  model = models.create_model(config.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  image = jax.random.normal(jax.random.key(1), (4, 64, 64, 1))

  def loss(params, rest, image):
    model = nnx.merge(graphdef, params, rest, copy=True)
    out = model(image, train=True)["mask_logits"]
    return jnp.mean(jnp.tanh(out) * jnp.arange(64.0)[:, None, None]), (
      out,
      nnx.state(model, nnx.BatchStat),
    )

  step = jax.value_and_grad(loss, has_aux=True)
  (_, (out1, stats1)), grads1 = platform.jit(step)(params, rest, image)
  mesh = sharding.create_mesh({"space": space})
  split = jax.device_put(image, sharding.image_sharded(mesh))
  lowered = platform.jit(step).lower(params, rest, split)
  text = lowered.compile().as_text()
  (_, (out2, stats2)), grads2 = platform.jit(step)(params, rest, split)
  return {
    "output": _max_diff([out1], [out2]),
    "grads": _max_diff(jax.tree.leaves(grads1), jax.tree.leaves(grads2)),
    "batch_stats": _max_diff(jax.tree.leaves(stats1), jax.tree.leaves(stats2)),
    "output_scale": float(np.max(np.abs(out1))),
    "halo_exchange": "collective-permute" in text,
    "output_spec": str(out2.sharding.spec),
  }


def train_step(space: int, shard_params: bool = False, base: int = 8) -> list[np.ndarray]:
  """Parameters after two real train steps (augmentation, losses, AdamW) on a 4-device mesh,
  and how many arrays of the state were split over devices."""
  config = _config(64)
  config.model.base_features = base
  mesh = sharding.create_mesh({"space": space})
  tx = steps.create_optimizer(config)
  abstract = jax.eval_shape(lambda: steps.create_train_state(config, tx))
  placed = sharding.state_sharding(abstract, mesh, shard_params)
  state = platform.jit(lambda: steps.create_train_state(config, tx), out_shardings=placed)()
  graphdef = nnx.graphdef(models.create_model(config.model, rngs=nnx.Rngs(0)))
  image_sharding = sharding.image_sharded(mesh) if space > 1 else None
  step = platform.jit(
    steps.make_train_step(graphdef, config, tx, image_sharding=image_sharding),
    out_shardings=(placed, sharding.replicated(mesh)),
  )
  rng = np.random.default_rng(0)
  for _ in range(2):
    image = rng.normal(size=(4, 64, 64, 1)).astype(np.float32)
    batch = {
      "image": image,
      "lung_mask": (image > 0).astype(np.float32),
      "has_mask": np.ones(4, np.float32),
      "weight": np.ones(4, np.float32),
      "label": np.zeros(4, np.int32),
    }
    state, _ = step(state, sharding.to_global(batch, mesh))
  split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
  return [np.asarray(x) for x in jax.tree.leaves(state.params)], split


def predict_4096(space: int) -> tuple[np.ndarray, np.ndarray]:
  """A 4096 x 4096 X-ray through a U-Net that sees 4096 px: p(lung) and the native mask."""
  config = _config(4096)
  config.model.base_features = 4
  config.mesh = {"data": -1, "space": space}
  model = models.create_model(config.model, rngs=nnx.Rngs(0))
  model.eval()
  inference = inference_lib.Inference(config, model, batch_size=1)
  yy, xx = np.mgrid[:4096, :4096]
  image = (128 + 100 * np.sin(xx / 300.0) * np.cos(yy / 500.0)).astype(np.uint8)
  (pred,) = inference_lib.predict_images(inference, [image])
  return pred.mask


def main() -> None:
  assert jax.device_count() == 4, jax.devices()
  result = {f"forward_backward_space{s}": forward_backward(s) for s in (2, 4)}
  one, _ = train_step(1)
  result["train_step_space2_vs_1"] = _max_diff(one, train_step(2)[0])
  result["param_scale"] = max(float(np.max(np.abs(p))) for p in one)
  wide, _ = train_step(1, base=16)  # its bottleneck kernels (18k values) are split
  fsdp, split = train_step(1, shard_params=True, base=16)
  result["train_step_fsdp_vs_replicated"] = _max_diff(wide, fsdp)
  result["fsdp_split_arrays"] = split
  whole, split = predict_4096(1), predict_4096(4)
  result["predict_4096"] = {
    "shape": list(split.shape),
    "lung_pixels": int(whole.sum()),
    "differing_pixels": int(np.sum(whole != split)),
  }
  json.dump(result, sys.stdout)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
