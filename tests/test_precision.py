"""float32 steps against a float64 reference, on the compiler options the project uses.

XLA:CPU's default YNNPACK convolutions compute float32 convolutions in reduced precision on
CPUs with avx512_bf16 (a U-Net's gradients ~2% off). `platform.jit` compiles every program
without them; these tests fail on such a CPU if a step slips back to XLA's defaults, and
the last one fails if any jit in the package bypasses `platform.jit`.
"""

import ast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import attention_unet as attention_unet_config
from configs import unet as unet_config
from cxr_jax.core import models
from cxr_jax.core.run import platform
from cxr_jax.core.training import steps
from tests.conftest import REPO_ROOT

# Worst relative error allowed over every gradient leaf (max |g32 - g64| / max |g64| per
# leaf). Accurate float32 steps measure ~5e-5 here; YNNPACK's convolutions 2e-2 on AVX-512
# BF16 CPUs.
TOLERANCE = 1e-3
# The reference: no YNNPACK at all (its kernels are float32-only anyway).
REFERENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _config(module, dtype: str = "float32"):
  config = module.get_config("smoke")
  # 32+ channels from the second level on: the convolutions XLA:CPU gives to YNNPACK.
  config.model.base_features = 16
  config.model.depth = 2
  config.model.dtype = dtype
  return config


def _batch(size: int = 32, count: int = 2) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  image = rng.normal(size=(count, size, size, 1)).astype(np.float32)
  yy, xx = np.mgrid[:size, :size]
  lungs = (yy - size / 2) ** 2 / 0.15 + (np.abs(xx - size / 2) - size / 5) ** 2 < size**2 / 4
  return {
    "image": image,
    "lung_mask": np.broadcast_to(lungs[None, :, :, None], image.shape).astype(np.float32),
    "has_mask": np.ones(count, np.float32),
    "weight": np.ones(count, np.float32),
    "label": np.arange(count, dtype=np.int32) % 2,
  }


def worst_relative_errors(module, options: dict[str, str] | None) -> dict[str, float]:
  """Worst relative error of the float32 training gradients and eval outputs compiled with
  `options` (None: `platform.compiler_options()`) against float64 (YNNPACK off)."""
  config = _config(module)
  model = models.create_model(config.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = _batch()
  jit = platform.jit if options is None else (lambda f: jax.jit(f, compiler_options=options))

  def step(graphdef, config):
    """(training gradients, eval logits): one program for both, one compile."""

    def run(params, rest, batch):
      grads = steps.loss_and_gradients(graphdef, config, params, rest, batch)[1]
      logits = nnx.merge(graphdef, params, rest)(batch["image"], train=False)["mask_logits"]
      return grads, logits

    return run

  grads32, logits32 = jit(step(graphdef, config))(params, rest, batch)
  with jax.enable_x64(True):
    config64 = _config(module, "float64")
    graphdef64 = nnx.graphdef(models.create_model(config64.model, rngs=nnx.Rngs(0)))
    to64 = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      tree,
    )
    reference = jax.jit(step(graphdef64, config64), compiler_options=REFERENCE_OPTIONS)
    grads64, logits64 = reference(to64(params), to64(rest), to64(batch))
    assert jax.tree.leaves(grads64)[0].dtype == jnp.float64  # really a float64 reference

    def relative(a, b) -> float:
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

    return {
      "grads": max(
        relative(a, b) for a, b in zip(jax.tree.leaves(grads32), jax.tree.leaves(grads64))
      ),
      "eval": relative(logits32, logits64),
    }


@pytest.mark.parametrize(
  "module", [unet_config, attention_unet_config], ids=["unet", "attention_unet"]
)
def test_float32_gradients_and_outputs_equal_a_float64_reference(module):
  errors = worst_relative_errors(module, options=None)
  assert 0 < errors["grads"] < TOLERANCE, errors  # 0 would mean nothing was compared
  assert 0 < errors["eval"] < TOLERANCE, errors


def _jit_calls(tree: ast.AST) -> list[int]:
  """Lines that call or reference `jax.jit` / `nnx.jit` or import `jit` from jax or flax."""
  lines = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and node.attr == "jit":
      if isinstance(node.value, ast.Name) and node.value.id in ("jax", "nnx"):
        lines.append(node.lineno)
    if isinstance(node, ast.ImportFrom) and node.module in ("jax", "flax.nnx"):
      lines += [node.lineno for alias in node.names if alias.name == "jit"]
  return sorted(lines)


def test_every_jit_in_the_package_goes_through_platform_jit():
  found = {
    str(path.relative_to(REPO_ROOT)): lines
    for path in sorted((REPO_ROOT / "cxr_jax").rglob("*.py"))
    if path.name != "platform.py" and (lines := _jit_calls(ast.parse(path.read_text())))
  }
  assert not found, f"jit without platform.jit's compiler options: {found}"
  # The check itself sees a bypass.
  assert _jit_calls(ast.parse("import jax\nf = jax.jit(g)\nfrom jax import jit")) == [2, 3]
