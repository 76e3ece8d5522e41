"""The run's programs on accelerators this machine does not have: every config's train, eval
and predict steps lower for TPU and CUDA (jax.export), and the smoke step compiles for a TPU
slice (libtpu's compile-only devices) with its memory read back."""

import glob
import importlib
import os
import re
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

from cxr_jax import aot as aot_command
from cxr_jax import errors
from cxr_jax.core.run import platform
from cxr_jax.core.run import sharding
from cxr_jax.workflows import aot
from cxr_jax.workflows import programs
from tests.conftest import REPO_ROOT

CONFIGS = sorted(
  os.path.basename(path)[:-3]
  for path in glob.glob(str(REPO_ROOT / "configs" / "*.py"))
  if not path.endswith("__init__.py")
)
ACCELERATORS = ("tpu", "cuda")
# Custom calls every backend's partitioner knows; any other target is some backend's kernel.
PORTABLE_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
LIBTPU_PROBLEM = aot.libtpu_problem()


def export_for_accelerators(jitted, *args) -> jax_export.Exported:
  """`jitted` lowered for TPU and CUDA; fails on a custom call that only some backend has
  (jax.export's allow-list passes CPU-only LAPACK kernels, so the targets are checked)."""
  exported = jax_export.export(jitted, platforms=ACCELERATORS)(*args)
  targets = set(re.findall(r"custom_call @([\w.$-]+)", exported.mlir_module()))
  assert targets <= PORTABLE_CUSTOM_CALLS, f"backend-specific custom calls: {targets}"
  return exported


@pytest.fixture(scope="module")
def one_device_mesh():
  return sharding.create_mesh({"data": 1, "space": 1}, devices=jax.devices()[:1])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_configs_train_eval_and_predict_steps_lower_for_tpu_and_cuda(name, one_device_mesh):
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  built = programs.build(config, one_device_mesh)
  batch = programs.abstract_batch(config, one_device_mesh, config.batch_size)
  predict_step, variables = programs.build_predict(config, one_device_mesh)
  for jitted, args in (
    (built.train_step, (built.abstract_state, batch)),
    (built.eval_step, (built.abstract_state, batch)),
    (predict_step, (variables, batch["image"])),
  ):
    exported = export_for_accelerators(jitted, *args)
    assert exported.platforms == ACCELERATORS


def test_a_step_with_a_cpu_only_kernel_fails_to_lower_for_the_accelerators():
  def lu_on_lapack(x):  # XLA:CPU's LAPACK kernel, which jax.export's allow-list lets through
    out = (x, jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    return jax.ffi.ffi_call(
      "lapack_sgetrf_ffi", tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in out)
    )(x)

  def unknown_kernel(x):  # a kernel registered for no accelerator
    return jax.ffi.ffi_call("cxr_cpu_only_kernel", jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

  square = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  with pytest.raises(AssertionError, match="lapack_sgetrf_ffi"):
    export_for_accelerators(jax.jit(lu_on_lapack), square)
  with pytest.raises(ValueError, match="custom calls"):
    export_for_accelerators(jax.jit(unknown_kernel), square)


def test_the_cpu_compiler_options_are_given_to_cpu_compiles_only():
  assert jax.default_backend() == "cpu"
  assert platform.compiler_options("cpu") == platform.CPU_OPTIONS
  assert platform.compiler_options("tpu") == {} and platform.compiler_options("gpu") == {}


def test_slice_names_map_to_jax_topologies_and_bad_ones_say_what_works():
  assert aot.parse_topology("v5e-8") == ("v5e", "v5e:2x4", (2, 4))
  assert aot.parse_topology("v5p-8") == ("v5p", "v5p:2x2x1", (2, 2, 1))  # 8 cores, 4 chips
  assert aot.parse_topology("v4-32") == ("v4", "v4:2x2x4", (2, 2, 4))
  assert aot.parse_topology("v6e:2x4") == ("v6e", "v6e:2x4", (2, 4))
  with pytest.raises(ValueError, match="v5e:2x2, v5e-8"):
    aot.parse_topology("h100:8")
  with pytest.raises(ValueError, match=r"v4 slices have 3 dimensions, e.g. v4:2x2x2"):
    aot.parse_topology("v4:2x2")


def test_without_libtpu_the_command_says_how_to_get_it_in_one_line(monkeypatch):
  def version(name):
    if name == "libtpu":
      raise metadata.PackageNotFoundError(name)
    return real(name)

  real = metadata.version
  monkeypatch.setattr(metadata, "version", version)
  with pytest.raises(
    errors.UserError, match=re.escape('pip install -e ".[tpu]" or pip install "libtpu==')
  ) as error:
    aot.get_topology("v5e:2x2")
  assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def compiled_on_v5e_2x2():
  if LIBTPU_PROBLEM:
    pytest.skip(LIBTPU_PROBLEM)
  config = importlib.import_module("configs.unet").get_config("smoke")
  config.mesh.space = 2  # 2 x 2: batches over data, each image's height over space
  topology = aot.get_topology("v5e:2x2")
  return config, topology, aot.compile_all(config, topology)


def test_the_smoke_steps_compile_for_a_v5e_2x2_slice_split_by_data_and_space(compiled_on_v5e_2x2):
  config, topology, (train, eval_, predict) = compiled_on_v5e_2x2
  assert topology.chips == 4 and topology.devices[0].device_kind == "TPU v5 lite"
  mesh = aot.run_mesh(config, topology)
  assert dict(mesh.shape) == {"data": 2, "space": 2}
  # Read back from the executable: each chip holds a quarter of each image batch (batch over
  # data, height over space) and half of each per-example value (batch over data).
  state_shardings, batch_shardings = train.executable.input_shardings[0]
  assert batch_shardings["image"].shard_shape((4, 32, 32, 1)) == (2, 16, 32, 1)
  assert batch_shardings["weight"].shard_shape((4,)) == (2,)
  # Memory per chip: at least the unpadded arrays (TPU tiles pad small minor dimensions).
  built = programs.build(config, mesh)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(built.abstract_state))
  assert train.argument_bytes > state_bytes + 2 * 16 * 32 * 4  # + a quarter of the images
  assert train.alias_bytes >= state_bytes  # the state is donated: updated in place
  assert train.temp_bytes > 0 and train.total_bytes < 0.1 * aot.GIB  # 29 MB: 11 MB of it code
  assert eval_.total_bytes < train.total_bytes and predict.total_bytes < train.total_bytes
  # FLOPs per chip: a quarter of the step's; a forward and backward pass ~3x a forward.
  assert 1e6 < train.flops and 1.5 * eval_.flops < train.flops


def test_the_aot_command_prints_memory_per_chip_first_then_the_roofline(compiled_on_v5e_2x2):
  config, topology, results = compiled_on_v5e_2x2
  lines = aot_command.memory_table(results, topology)
  assert lines[0].startswith("Per chip of v5e:2x2 (v5e-4, TPU v5 lite: 4 chips, 1 host), GiB")
  assert [line.split()[0] for line in lines[2:]] == ["train", "eval", "predict"]
  assert all("fits" in line for line in lines[2:])
  speed = aot_command.speed_lines(results[0], config, topology)
  assert "197 TFLOP/s bf16, 819 GB/s" in speed[1] and "MFU at most" in speed[1]
  line = aot.roofline(results[0], topology.chip)
  assert line.step_s == max(line.compute_s, line.memory_s) and 0 < line.mfu <= 1
  assert np.isclose(line.compute_s, results[0].flops / 197e12)
