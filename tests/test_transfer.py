"""Transfer learning: converted encoders equal the PyTorch libraries' modules, init_from's
formats and reports, the fine-tuning schedule, and smoke runs that start from weights.

The references are in tests/fixtures/encoders, written by benchmarks/make_encoder_fixtures.py
with the real torchvision / timm / TorchXRayVision modules (torch is not needed here).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import nnx

from configs import default
from cxr_jax.core import models
from cxr_jax.core.models import densenet
from cxr_jax.core.models import encoder_models
from cxr_jax.core.models import pretrained
from cxr_jax.core.run import platform
from cxr_jax.core.run import rundir
from cxr_jax.core.training import steps
from cxr_jax.core.training import transfer
from cxr_jax.workflows import train
from tests import encoder_weights
from tests.encoder_weights import FIXTURES


def model_config(encoder: str, name: str = "classifier", num_classes: int = 2):
  config = default.get_config("smoke")
  config.model.name, config.model.encoder, config.model.num_classes = name, encoder, num_classes
  return config


def load(model: nnx.Module, state_dict) -> pretrained.LoadReport:
  """Converts `state_dict` into `model` in place; returns the report."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  arrays, report = pretrained.convert(state_dict, pretrained.target_shapes(params, rest))
  nnx.update(model, pretrained.replace(params, arrays), pretrained.replace(rest, arrays))
  return report


def outputs(model: nnx.Module, image: np.ndarray) -> dict[str, np.ndarray]:
  """Logits and per-stage channel means, as the fixtures hold them, eval mode."""
  graphdef, state = nnx.split(model)

  def forward(state, x):
    model = nnx.merge(graphdef, state)
    features = model.encoder(x, train=False)
    pooled = model.encoder.head_input(features[-1]).mean(axis=(1, 2))
    out = {"logits": model.head(pooled)}
    out.update({f"stage{i}": f.mean(axis=(1, 2)) for i, f in enumerate(features)})
    return out

  return jax.device_get(platform.jit(forward)(state, jnp.asarray(image)[..., None]))


def assert_close(got: dict, want, name: str) -> None:
  for key in want.files:
    scale = np.abs(want[key]).max()
    error = np.abs(got[key] - want[key]).max()
    assert error <= 2e-4 * scale + 1e-6, f"{name} {key}: max error {error} (scale {scale})"


@pytest.mark.parametrize("name", list(encoder_weights.MODELS))
def test_converted_encoders_compute_what_the_reference_libraries_compute(name):
  encoder, num_classes, _ = encoder_weights.MODELS[name]
  meta = json.loads((FIXTURES / f"{name}.json").read_text())
  config = model_config(encoder, num_classes=num_classes)
  # Shapes only: every variable is loaded (asserted below), so none needs initialising.
  model = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  report = load(model, encoder_weights.random_state_dict(meta["schema"], meta["seed"]))
  assert report.left_at_init == [] and report.unused == []
  assert len(report.loaded) == sum(not k.endswith("num_batches_tracked") for k in meta["schema"])
  with np.load(FIXTURES / f"{name}.npz") as want:
    assert_close(outputs(model, encoder_weights.test_image()), want, name)


def bit_npz(tmp_path: pathlib.Path, layout: str) -> tuple[str, dict]:
  """The BiT fixture's weights in an .npz as big_vision saves a checkpoint ('params/...') or
  as the public BiT files hold them (big_transfer's names and shapes); its path and meta."""
  meta = json.loads((FIXTURES / "big_vision_bit_r50x1.json").read_text())
  weights = encoder_weights.random_bit_weights(meta["schema"], meta["seed"])
  if layout == "big_transfer":
    arrays = {k: weights[name].reshape(shape) for k, (name, shape) in meta["legacy"].items()}
  else:
    arrays = {f"params/{k}": v for k, v in weights.items()}
  path = tmp_path / f"{layout}.npz"
  np.savez(path, **arrays)
  return str(path), meta


@pytest.mark.parametrize("layout", ["big_vision", "big_transfer"])
def test_bit_npz_files_compute_what_big_vision_computes(layout, tmp_path):
  name = "big_vision_bit_r50x1"
  encoder, num_classes = encoder_weights.BIT_MODELS[name]
  path, meta = bit_npz(tmp_path, layout)
  config = model_config(encoder, num_classes=num_classes)
  model = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  report = load(model, pretrained.read_state_dict(path))
  assert report.left_at_init == [] and report.unused == []
  assert len(report.loaded) == len(meta["schema"]) == 153  # R50x1 and its 1000-class head
  key = {"big_transfer": "resnet/block4/unit03/c/group_norm/gamma"}.get(
    layout, "params/block4/unit03/gn3/scale"
  )
  assert report.loaded[key] == "encoder.block4.unit03.gn3.scale"
  with np.load(FIXTURES / f"{name}.npz") as want:
    assert_close(outputs(model, encoder_weights.test_image()), want, f"{name} ({layout})")


def test_a_head_of_other_classes_is_reported_unused_and_the_encoder_loads(tmp_path):
  path, meta = bit_npz(tmp_path, "big_transfer")
  config = model_config("bit_r50x1", num_classes=2)
  model = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  report = load(model, pretrained.read_state_dict(path))
  assert sorted(report.unused) == ["resnet/head/conv2d/bias", "resnet/head/conv2d/kernel"]
  assert report.left_at_init == ["head.bias", "head.kernel"]
  assert len(report.loaded) == len(meta["schema"]) - 2
  assert any("head of shape (2048, 1000)" in note for note in report.notes)
  weights = encoder_weights.random_bit_weights(meta["schema"], meta["seed"])
  kernel = model.encoder.block2.unit01.conv_proj.kernel.get_value()
  assert np.array_equal(kernel, weights["block2/unit01/conv_proj/kernel"])


def tiny_densenet() -> nnx.Module:
  """The fixture's torchvision DenseNet(growth_rate=4, block_config=(1,1,1,1), ...)."""

  def build(*, in_features, dtype, rngs):
    return densenet.DenseNetEncoder(
      in_features=in_features,
      growth=4,
      blocks=(1, 1, 1, 1),
      stem_width=8,
      bn_size=2,
      dtype=dtype,
      rngs=rngs,
    )

  return encoder_models.EncoderClassifier(
    build, model_config("", num_classes=5).model, rngs=nnx.Rngs(0)
  )


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_state_dict_files_saved_by_torch_load_and_compute_the_same(suffix):
  if suffix == ".pth":
    pytest.importorskip("torch")
  state_dict = pretrained.read_state_dict(str(FIXTURES / f"tiny_densenet{suffix}"))
  model = tiny_densenet()
  report = load(model, state_dict)
  assert report.left_at_init == [] and report.unused == []
  assert any("summed over its 3 input channels" in note for note in report.notes)
  with np.load(FIXTURES / "tiny_densenet.npz") as want:
    assert_close(outputs(model, encoder_weights.test_image()), want, "tiny_densenet")


def test_npz_state_dicts_read_back_the_arrays_and_unknown_keys_are_reported(tmp_path):
  state = safetensors.numpy.load_file(str(FIXTURES / "tiny_densenet.safetensors"))
  state["extra.weight"] = np.ones((3, 3), np.float32)
  np.savez(tmp_path / "weights.npz", **state)
  read = pretrained.read_state_dict(str(tmp_path / "weights.npz"))
  assert all(np.array_equal(read[k], state[k]) for k in state)
  assert load(tiny_densenet(), read).unused == ["extra.weight"]


def test_a_shape_mismatch_is_refused_naming_the_parameter_and_both_shapes():
  schema = encoder_weights.load_schema("torchvision_resnet50")
  model = nnx.eval_shape(
    lambda: models.create_model(model_config("resnet18").model, rngs=nnx.Rngs(0))
  )
  with pytest.raises(
    ValueError,
    match=r"layer1\.0\.conv1\.weight has shape \(1, 1, 64, 64\)"
    r".*encoder\.layer1\.0\.conv1\.kernel has shape \(3, 3, 64, 64\)",
  ):
    load(model, encoder_weights.random_state_dict(schema, 0))


def test_torchxrayvision_weights_set_their_input_scale_and_imagenet_ones_do_not():
  xrv = encoder_weights.random_state_dict(
    encoder_weights.load_schema("torchxrayvision_densenet121"), 0
  )
  imagenet = encoder_weights.random_state_dict(
    encoder_weights.load_schema("torchvision_resnet18"), 0
  )
  assert pretrained.input_scale_for(xrv) == pretrained.XRV_INPUT_SCALE
  assert pretrained.input_scale_for(imagenet) == 1.0


def test_the_encoder_stays_frozen_for_k_steps_then_learns_at_its_multiplier():
  config = model_config("resnet18")
  config.optim.encoder_frozen_steps, config.optim.encoder_lr_multiplier = 2, 0.5
  config.optim.grad_clip, config.optim.name = 0.0, "adam"
  config.optim.schedule, config.optim.warmup_steps = "constant", 0
  params = {"encoder": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
  tx = steps.create_optimizer(config)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  moves = []
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    moves.append((float(updates["encoder"]["w"][0]), float(updates["head"]["w"][0])))
  lr = config.optim.learning_rate
  assert moves[0][0] == moves[1][0] == 0.0 and moves[0][1] == pytest.approx(-lr, rel=1e-4)
  assert moves[2][0] == pytest.approx(-0.5 * lr, rel=1e-4)
  assert moves[2][1] == pytest.approx(-lr, rel=1e-4)
  assert transfer.encoder_labels(params) == {"encoder": {"w": "encoder"}, "head": {"w": "rest"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, pathlib.Path]:
  """A resnet18 U-Net smoke run from torchvision-layout weights (.safetensors), then a
  classifier on its encoder (init_from the run directory)."""
  root = tmp_path_factory.mktemp("transfer")
  schema = encoder_weights.load_schema("torchvision_resnet18")
  weights = encoder_weights.random_state_dict(schema, 0)
  safetensors.numpy.save_file(weights, str(root / "resnet18.safetensors"))
  config = model_config("resnet18", name="unet")
  config.data.data_dir = str(root / "tfds")
  config.model.init_from = str(root / "resnet18.safetensors")
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 2, 2
  config.optim.encoder_frozen_steps = 1
  train.train_and_evaluate(config, str(root / "segmentation"))
  config.model.name, config.model.init_from = "classifier", str(root / "segmentation")
  config.model.freeze_bn = True
  config.optim.ema_decay = 0.9  # the EMA starts from the loaded weights (its own buffers)
  config.best_metric = "auc"
  config.data.examples = "all_without_masks"
  train.train_and_evaluate(config, str(root / "classifier"))
  return {"root": root, "weights": weights}


def test_a_unet_on_a_pretrained_encoder_trains_a_smoke_run(runs):
  lines = (runs["root"] / "segmentation" / "metrics.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert any(row["split"] == "validation" and 0 <= row["dice"] <= 1 for row in rows)
  record = json.loads((runs["root"] / "segmentation" / "config.json").read_text())
  assert record["config"]["model"]["encoder"] == "resnet18"
  assert record["config"]["model"]["input_scale"] == 1.0


def test_a_unet_on_a_bit_encoder_trains_from_a_public_bit_file(tmp_path, data_dir):
  path, _ = bit_npz(tmp_path, "big_transfer")
  config = model_config("bit_r50x1", name="unet")
  config.data.data_dir = str(data_dir)
  config.model.init_from, config.model.base_features = path, 4
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 1, 1, 1
  train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert any(row["split"] == "validation" and 0 <= row["dice"] <= 1 for row in rows)
  assert any(row["split"] == "train" and np.isfinite(row["loss"]) for row in rows)
  _, model, _ = rundir.restore_model(str(tmp_path / "run"), "latest")
  assert model.encoder.block4.unit03.conv3.kernel.shape == (1, 1, 512, 2048)


def test_init_from_a_run_loads_exactly_its_encoder_and_leaves_the_head_at_init(runs):
  root = runs["root"]
  _, segmentation, _ = rundir.restore_model(str(root / "segmentation"), "best")
  config = rundir.load_config(str(root / "classifier"))
  fresh = steps.create_train_state(config, optax.identity())
  params, rest, report = transfer.load_init_from(
    str(root / "segmentation"), fresh.params, fresh.model_state
  )
  source = dict(nnx.to_flat_state(nnx.state(segmentation)))
  for path, variable in nnx.to_flat_state(params):
    if path[0] == "encoder":
      assert np.array_equal(variable.get_value(), source[path].get_value()), path
  fresh_flat = dict(nnx.to_flat_state(fresh.params))
  for path, variable in nnx.to_flat_state(params):
    if path[0] != "encoder":
      assert np.array_equal(variable.get_value(), fresh_flat[path].get_value()), path
  assert report.left_at_init == ["head.bias", "head.kernel"]
  assert all(name.startswith(("decoder", "head")) for name in report.unused)
