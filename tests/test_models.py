"""Tests for cxr_jax.models: shapes, parameter counts, gates, mixed precision, learning.

XLA compiles are the cost on a shared CPU, so shapes and counts use abstract evaluation
(`nnx.eval_shape`, no compile) and each numeric test compiles one jitted function.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from cxr_jax.core.models import MODELS
from cxr_jax.core.models import AttentionUNet
from cxr_jax.core.models import Classifier
from cxr_jax.core.models import MultiTaskUNet
from cxr_jax.core.models import UNet
from cxr_jax.core.models import create_model
from cxr_jax.core.models import layers
from cxr_jax.core.models import ops
from cxr_jax.core.run import platform

TINY = dict(base_features=4, depth=2)
TINY_TRAIN = dict(base_features=4, depth=1)  # about half the ops to compile


def _rngs() -> nnx.Rngs:
  # 'rbg' keys: XLA compiles a model's random initialisation in seconds, where the default
  # threefry takes about a minute on a loaded 2-core CPU.
  return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _param_count(model: nnx.Module) -> int:
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _abstract(cls: type, **kwargs) -> nnx.Module:
  return nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))


def _output_shapes(model: nnx.Module, shape: tuple[int, ...], **call_kwargs) -> dict:
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  out = nnx.eval_shape(lambda m, x: m(x, train=False, **call_kwargs), model, x)
  return jax.tree.map(lambda a: a.shape, out)


# ----- registry and config -----


def test_create_model_from_default_config_for_every_name():
  config = default.get_config("smoke")
  for name, cls in MODELS.items():
    config.model.name = name
    model = nnx.eval_shape(lambda: create_model(config.model, rngs=nnx.Rngs(0)))
    assert type(model) is cls


def test_unknown_name_lists_valid_names():
  config = default.get_config().model
  config.name = "unte"
  with pytest.raises(ValueError, match="unte") as error:
    create_model(config, rngs=nnx.Rngs(0))
  for name in MODELS:
    assert name in str(error.value)


@pytest.mark.parametrize(
  "key,value", [("norm", "layer"), ("upsample", "deconv"), ("dtype", "float16")]
)
def test_bad_option_names_the_config_key(key, value):
  config = default.get_config().model
  config[key] = value
  with pytest.raises(ValueError, match=f"config.model.{key}"):
    nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))


# ----- shapes -----


@pytest.mark.parametrize("cls", [UNet, AttentionUNet, MultiTaskUNet])
@pytest.mark.parametrize("height,width", [(16, 16), (32, 32), (16, 48), (64, 32)])
def test_segmenter_shapes(cls, height, width):
  shapes = _output_shapes(_abstract(cls, **TINY), (2, height, width, 1))
  assert shapes["mask_logits"] == (2, height, width, 1)
  if cls is MultiTaskUNet:
    assert shapes["class_logits"] == (2, 2)


@pytest.mark.parametrize("height,width", [(16, 16), (48, 32), (32, 80)])
def test_classifier_takes_any_size_divisible_by_its_stride(height, width):
  model = _abstract(Classifier, num_classes=3, **TINY)
  assert _output_shapes(model, (2, height, width, 1)) == {"class_logits": (2, 3)}


@pytest.mark.parametrize("cls", list(MODELS.values()))
@pytest.mark.parametrize("height,width", [(18, 16), (16, 30)])
def test_size_not_divisible_by_stride_is_a_clear_error(cls, height, width):
  model = _abstract(cls, **TINY)  # stride 2**2 = 4
  with pytest.raises(ValueError, match=rf"multiples of 4; got {height}x{width}") as error:
    _output_shapes(model, (1, height, width, 1))
  assert "16 or 20" in str(error.value) or "28 or 32" in str(error.value)


def test_attention_maps_are_shaped_like_their_skips():
  model = _abstract(AttentionUNet, base_features=4, depth=3)
  shapes = _output_shapes(model, (2, 32, 48, 1), return_attention=True)
  assert shapes["attention"] == [(2, 32, 48, 1), (2, 16, 24, 1), (2, 8, 12, 1)]


# ----- parameter counts (hand-derived in unet.py / attention_unet.py docstrings) -----


def test_unet_has_the_published_31m_parameters():
  assert _param_count(_abstract(UNet, base_features=64, depth=4, norm="none")) == 31_030_593
  # Norm: conv biases dropped (-5,888), scale and shift added (+11,776).
  assert _param_count(_abstract(UNet, base_features=64, depth=4, norm="batch")) == 31_036_481
  assert _param_count(_abstract(UNet, base_features=64, depth=4, norm="group")) == 31_036_481


def test_attention_unet_adds_1_045_444_gate_parameters():
  assert (
    _param_count(_abstract(AttentionUNet, base_features=64, depth=4, norm="none"))
    == 31_030_593 + 1_045_444
  )
  assert (
    _param_count(_abstract(AttentionUNet, base_features=64, depth=4, norm="batch"))
    == 31_036_481 + 1_045_444
  )


def test_multitask_adds_a_dense_head_on_the_bottleneck():
  assert (
    _param_count(_abstract(MultiTaskUNet, base_features=64, depth=4, norm="batch"))
    == 31_036_481 + 1024 * 2 + 2
  )


def test_classifier_parameter_count():
  # base b=16, depth 4, 2 classes, norm: convs without bias, each norm 2*C.
  b, total, width = 16, 9 * 16 + 2 * 16, 16  # stem
  for i in range(4):
    out = b * 2 ** (i + 1)
    total += 9 * width * out + 9 * out * out + width * out + 3 * 2 * out  # block 1 + shortcut
    total += 2 * 9 * out * out + 2 * 2 * out  # block 2
    width = out
  total += width * 2 + 2  # dense head
  assert total == 2_790_770
  assert _param_count(_abstract(Classifier, base_features=16, depth=4)) == total


def test_transpose_conv_matches_nnx_conv_transpose_with_flipped_kernel():
  @platform.jit
  def run(x):
    up = layers.TransposeConv2x2(3, 5, dtype=jnp.float32, rngs=_rngs())
    up.bias[...] = jnp.arange(5.0)
    reference = nnx.ConvTranspose(3, 5, (2, 2), strides=2, padding="VALID", rngs=_rngs())
    reference.kernel[...] = up.kernel[...][::-1, ::-1]
    reference.bias[...] = up.bias[...]
    return up(x), reference(x)

  out, expected = run(jnp.arange(2 * 4 * 6 * 3.0).reshape(2, 4, 6, 3) / 100)
  assert out.shape == (2, 8, 12, 5)
  np.testing.assert_allclose(out, expected, atol=1e-5)


# ----- numerics (one compile each) -----


def test_attention_coefficients_in_unit_interval_and_bfloat16_matches_float32():
  # One compile for both checks (the multi-task test also trains in bf16).
  @platform.jit
  def run(x):
    outputs, states = [], []
    for dtype in ("float32", "bfloat16"):
      model = AttentionUNet(**TINY, dtype=dtype, rngs=_rngs())  # same seed: same parameters
      outputs.append(model(x, train=True, return_attention=True))  # bf16 batch statistics
      states.append(nnx.state(model, nnx.Param, nnx.BatchStat))
    return outputs, states

  x = 3.0 * jax.random.normal(jax.random.key(2), (2, 16, 24, 1))
  (out32, out16), (_, state16) = run(x)
  assert [a.shape for a in out32["attention"]] == [(2, 16, 24, 1), (2, 8, 12, 1)]
  for alpha in out32["attention"] + out16["attention"]:
    assert alpha.dtype == jnp.float32
    assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0
    assert float(alpha.max() - alpha.min()) > 0.0  # the gate depends on the input
  for got, want in zip(jax.tree.leaves(out16), jax.tree.leaves(out32)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.abs(want).max()) + 1e-3)
  assert {v.dtype for v in jax.tree.leaves(state16)} == {jnp.dtype(jnp.float32)}


# ----- learning, with the trainer's jit(split/merge) pattern -----


def _segmentation_loss(out, batch):
  return optax.sigmoid_binary_cross_entropy(out["mask_logits"], batch["mask"]).mean()


def _classification_loss(out, batch):
  return optax.softmax_cross_entropy_with_integer_labels(out["class_logits"], batch["label"]).mean()


def _tiny_batch():
  yy, xx = jnp.mgrid[:16, :16]
  disc = ((yy - 8.0) ** 2 + (xx - 6.0) ** 2 < 20).astype(jnp.float32)
  images = jnp.stack([disc, 1 - disc, jnp.roll(disc, 4, axis=1), 0.5 * disc])[..., None]
  images = images + 0.1 * jax.random.normal(jax.random.key(3), images.shape)
  return {
    "image": images,
    "mask": (images > 0.3).astype(jnp.float32),
    "label": jnp.array([0, 1, 0, 1]),
  }


def _train(cls, loss_fn, steps: int = 20, **kwargs):
  """Adam on one batch via jax.jit over nnx.split state; returns (losses, model0, model)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: _model_and_optimizer(cls, **kwargs)))

  @platform.jit
  def init():
    return nnx.state(_model_and_optimizer(cls, **kwargs))

  @platform.jit  # donate_argnums=0 in the trainer; not here, the test keeps state0
  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(batch["image"], train=True), batch))(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  batch = _tiny_batch()
  state0 = state = init()
  losses = []
  for _ in range(steps):
    state, loss = step(state, batch)
    losses.append(float(loss))
  return losses, nnx.merge(graphdef, state0)[0], nnx.merge(graphdef, state)[0]


def _model_and_optimizer(cls, **kwargs):
  model = cls(**TINY_TRAIN, **kwargs, rngs=_rngs())
  return model, nnx.Optimizer(model, optax.adam(2e-2), wrt=nnx.Param)


def test_unet_learns_under_jit_split_merge_and_updates_batch_stats_and_dropout():
  losses, model0, model = _train(UNet, _segmentation_loss, dropout=0.1)
  assert losses[-1] < 0.5 * losses[0], losses
  stats0 = jax.tree.leaves(nnx.state(model0, nnx.BatchStat))
  stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  assert any(not np.allclose(a, b) for a, b in zip(stats0, stats))  # running averages moved
  counts0 = jax.tree.leaves(nnx.state(model0, nnx.RngCount))
  counts = jax.tree.leaves(nnx.state(model, nnx.RngCount))
  assert counts and all(int(c) > int(c0) for c0, c in zip(counts0, counts))  # fresh masks


@pytest.mark.parametrize(
  "cls,loss_fn,kwargs",
  [
    (AttentionUNet, _segmentation_loss, dict(norm="group", upsample="resize")),
    (Classifier, _classification_loss, {}),
  ],
)
def test_model_learns_one_batch(cls, loss_fn, kwargs):
  losses, _, _ = _train(cls, loss_fn, **kwargs)
  assert losses[-1] < 0.5 * losses[0], losses


def test_multitask_learns_both_heads_in_bfloat16():
  losses, _, model = _train(
    MultiTaskUNet,
    lambda out, batch: _segmentation_loss(out, batch) + _classification_loss(out, batch),
    dtype="bfloat16",
  )
  assert losses[-1] < 0.5 * losses[0], losses
  state = nnx.state(model, nnx.Param, nnx.BatchStat)
  assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}


# ----- the faster CPU paths equal what they replace -----


def test_the_cpu_compiler_options_take_convolutions_from_ynnpack_and_keep_their_values():
  assert platform.compiler_options() == platform.CPU_OPTIONS  # the test machine is a CPU

  def kernel_grad(x, kernel, dy):  # no reduction: nothing else YNNPACK could take
    return jax.vjp(lambda k: ops.conv3x3(x, k), kernel)[1](dy)[0]

  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))  # 32 channels: YNNPACK's
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 32, 32))
  dy = jax.random.normal(jax.random.key(2), (2, 16, 16, 32))
  default_xla = jax.jit(kernel_grad).lower(x, kernel, dy).compile()
  ours = jax.jit(kernel_grad, compiler_options=platform.compiler_options())
  ours = ours.lower(x, kernel, dy).compile()
  assert "__ynn_fusion" in default_xla.as_text()
  assert "__ynn_fusion" not in ours.as_text()  # XLA's own (Eigen) convolution
  np.testing.assert_allclose(ours(x, kernel, dy), default_xla(x, kernel, dy), rtol=1e-4, atol=1e-3)


def test_upconv2x2_and_its_gradients_equal_xlas_transposed_convolution():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 6))
  kernel = jax.random.normal(jax.random.key(1), (2, 2, 6, 4)) * 0.3

  def reference(x, kernel):  # flax's ConvTranspose convention: the kernel flipped
    return jax.lax.conv_transpose(
      x, kernel[::-1, ::-1], (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def loss(up):
    return lambda x, k: jnp.sum(jnp.sin(up(x, k)) * jnp.arange(4.0))

  np.testing.assert_allclose(ops.upconv2x2(x, kernel), reference(x, kernel), atol=1e-5)
  got = platform.jit(jax.grad(loss(ops.upconv2x2), argnums=(0, 1)))(x, kernel)
  want = platform.jit(jax.grad(loss(reference), argnums=(0, 1)))(x, kernel)
  for g, w in zip(got, want):
    assert g.shape == w.shape and float(jnp.max(jnp.abs(w))) > 0.5
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_max_pool_gradient_equals_autodiffs_with_ties_shared():
  x = jax.random.normal(jax.random.key(5), (2, 8, 6, 3))
  x = x.at[0, 2, 2, 0].set(9.0).at[0, 3, 3, 0].set(9.0)  # window (1, 1): two maxima
  x = jax.nn.relu(x)  # windows of zeros, as after the U-Net's ReLU

  def reference(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  weights = jnp.arange(2 * 4 * 3 * 3.0).reshape(2, 4, 3, 3)
  np.testing.assert_array_equal(ops.max_pool_2x2(x), reference(x))
  got = jax.grad(lambda x: jnp.sum(ops.max_pool_2x2(x) * weights))(x)
  want = jax.grad(lambda x: jnp.sum(reference(x) * weights))(x)
  assert float(got[0, 2, 2, 0]) == float(got[0, 3, 3, 0]) == float(weights[0, 1, 1, 0]) / 2 > 0
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_convolution_of_parts_equals_the_convolution_of_their_concatenation():
  block = layers.ConvNormAct(12, 8, norm="batch", dtype=jnp.float32, rngs=nnx.Rngs(0))
  a = jax.random.normal(jax.random.key(2), (2, 16, 16, 5))
  b = jax.random.normal(jax.random.key(3), (2, 16, 16, 7))
  whole = block(jnp.concatenate([a, b], axis=-1), train=False)
  np.testing.assert_allclose(block([a, b], train=False), whole, atol=1e-5)


def test_batch_norm_train_equals_flax_batchnorm_with_its_gradient_and_running_stats():
  x = jax.random.normal(jax.random.key(4), (4, 8, 8, 6)) * 3 + 1
  ours = layers.Norm("batch", 6, dtype=jnp.float32, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0))
  for module in (ours.norm, theirs):
    module.scale[...] = jnp.linspace(0.5, 2.0, 6)
    module.bias[...] = jnp.linspace(-1.0, 1.0, 6)

  def loss(module, call):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def f(params, x):
      m = nnx.merge(graphdef, params, rest, copy=True)
      y = call(m, x)
      return jnp.sum(jnp.tanh(y) * x), nnx.state(m, nnx.BatchStat)

    return jax.grad(f, argnums=(0, 1), has_aux=True)(params, x)

  (g_ours, stats_ours) = loss(ours, lambda m, x: m(x, train=True))
  (g_theirs, stats_theirs) = loss(theirs, lambda m, x: m(x, use_running_average=False))
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(stats_ours), jax.tree.leaves(stats_theirs)):
    assert float(jnp.max(jnp.abs(b - jnp.round(b)))) > 0  # moved from their initial values
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----- deep supervision -----


@pytest.mark.parametrize("name", ["unet", "attention_unet", "multitask"])
def test_deep_supervision_adds_a_lung_head_per_lower_level_in_training_only(name):
  config = default.get_config("smoke")
  config.model.name, config.model.depth, config.model.deep_supervision = name, 3, 2
  model = create_model(config.model, rngs=nnx.Rngs(0))
  x = jnp.zeros((2, 32, 32, 1))
  aux = model(x, train=True)["aux_mask_logits"]
  assert [a.shape for a in aux] == [(2, 16, 16, 1), (2, 8, 8, 1)]
  assert "aux_mask_logits" not in model(x, train=False)  # eval, inference and export: none
  base = config.model.base_features
  extra = sum(
    p.size
    for p in jax.tree.leaves(
      nnx.state(model.aux_heads if name == "unet" else model.unet.aux_heads, nnx.Param)
    )
  )
  assert extra == (2 * base + 1) + (4 * base + 1)  # a 1x1 conv on each level's width


def test_deep_supervision_loss_is_nnunets_halving_normalised_sum():
  from cxr_jax.core.training import heads  # noqa: PLC0415
  from cxr_jax.core.training import losses  # noqa: PLC0415

  config = default.get_config("smoke")
  rng = np.random.default_rng(0)
  mask = (rng.random((2, 16, 16, 1)) < 0.5).astype(np.float32)
  batch = {"lung_mask": mask, "has_mask": np.ones(2, np.float32), "weight": np.ones(2, np.float32)}
  full = jnp.asarray(rng.normal(size=(2, 16, 16, 1)), jnp.float32)
  aux = [jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32), jnp.zeros((2, 4, 4, 1))]
  total, parts = heads.compute_losses({"mask_logits": full, "aux_mask_logits": aux}, batch, config)
  pooled = [mask.reshape(2, 16 // f, f, 16 // f, f, 1).mean(axis=(2, 4)) for f in (2, 4)]
  level = [
    float(losses.segmentation_loss(x, m, batch["weight"])) for x, m in zip(aux, pooled, strict=True)
  ]
  l0 = float(losses.segmentation_loss(full, mask, batch["weight"]))
  assert float(parts["seg_loss"]) == pytest.approx(l0, rel=1e-6)
  assert float(parts["deep_supervision_loss"]) == pytest.approx(
    level[0] / 2 + level[1] / 4, rel=1e-5
  )
  assert float(total) == pytest.approx((l0 + level[0] / 2 + level[1] / 4) / 1.75, rel=1e-5)


def test_deep_supervision_of_a_model_without_a_unet_decoder_is_refused_in_one_line():
  config = default.get_config("smoke")
  config.model.deep_supervision = 1
  for name, encoder in [("classifier", ""), ("unet", "resnet18")]:
    config.model.name, config.model.encoder = name, encoder
    with pytest.raises(ValueError, match=r"deep_supervision=1 supervises the decoder"):
      create_model(config.model, rngs=nnx.Rngs(0))
  config.model.name, config.model.encoder, config.model.deep_supervision = "unet", "", 4
  with pytest.raises(ValueError, match=r"deep_supervision=4: the decoder has 1 levels .*depth=2"):
    create_model(config.model, rngs=nnx.Rngs(0))
