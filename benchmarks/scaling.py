"""Scaling of the trainer's own train step (not run by CI); prints markdown tables.

  python benchmarks/scaling.py                         # every table, forced CPU devices
  python benchmarks/scaling.py --parts=spatial --budget_mb=16000 --sides=1024,2048,4096
  python benchmarks/scaling.py --devices=1,2,4,8 --accelerator   # the real devices of a host

(a) weak scaling (fixed batch per device) and strong scaling (fixed global batch) over 1, 2,
4, 8 devices and over 2 processes x 2 devices (gloo, as `launch/multihost_cpu.sh`): images/s,
per device, and efficiency against one device. (b) spatial scaling: the largest image side
whose train step compiles within `--budget_mb` per device (XLA's compiled memory analysis:
arguments + outputs + temporaries), with the height split over `space` = 1, 2, 4 devices, and
the step time at `--fixed_side`. (c) MFU where the device's peak is known (`utilisation`).

The step is `steps.make_train_step` (paired augmentation, forward, losses, AdamW), jitted
over `sharding.create_mesh` as in training. Each row runs in a fresh process: on a CPU the
devices are forced with XLA_FLAGS and share the machine's cores, so the tables there measure
what partitioning costs, not a speed-up; on a GPU/TPU host (`--accelerator`) they are real.
"""

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----- one measurement, in its own process -----


def _config(args, size: int, global_batch: int, space: int):
  from configs import default

  config = default.get_config()
  config.model.name = args.model
  config.model.base_features = args.base_features
  config.model.depth = args.depth
  config.model.dtype = args.dtype
  config.data.image_size = size
  config.batch_size = global_batch
  config.mesh = {"data": -1, "space": space}
  return config


def _compiled_step(config, mesh, *, abstract: bool):
  """(compiled step, state, batch): the trainer's step over `mesh`, lowered for its inputs."""
  import jax
  import numpy as np
  from flax import nnx

  from cxr_jax.core import models
  from cxr_jax.core.run import platform
  from cxr_jax.core.run import sharding
  from cxr_jax.core.training import steps

  tx = steps.create_optimizer(config)
  init = lambda: steps.create_train_state(config, tx)  # noqa: E731
  placed = sharding.state_sharding(jax.eval_shape(init), mesh, False)
  graphdef = nnx.graphdef(
    nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
  )
  image_sharding = sharding.image_sharded(mesh) if sharding.space_size(mesh) > 1 else None
  step = platform.jit(
    steps.make_train_step(graphdef, config, tx, image_sharding=image_sharding),
    out_shardings=(placed, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  size, rows = config.data.image_size, config.batch_size // jax.process_count()
  fields = {"image": np.float32, "lung_mask": np.float32, "has_mask": np.float32,
            "weight": np.float32, "label": np.int32}  # fmt: skip
  shapes = {k: (config.batch_size, size, size, 1) if k in ("image", "lung_mask") else
            (config.batch_size,) for k in fields}  # fmt: skip
  if abstract:
    state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(init), placed
    )
    batch = {
      k: jax.ShapeDtypeStruct(shapes[k], fields[k], sharding=(
        sharding.image_sharded(mesh) if len(shapes[k]) == 4 else sharding.data_sharded(mesh)))
      for k in fields
    }  # fmt: skip
  else:
    state = platform.jit(init, out_shardings=placed)()
    rng = np.random.default_rng(jax.process_index())
    image = rng.normal(size=(rows, size, size, 1)).astype(np.float32)
    host = {"image": image, "lung_mask": (image > 0).astype(np.float32),
            "has_mask": np.ones(rows, np.float32), "weight": np.ones(rows, np.float32),
            "label": np.zeros(rows, np.int32)}  # fmt: skip
    batch = sharding.to_global(host, mesh)
  return step.lower(state, batch).compile(), state, batch


def measure(args, size: int, global_batch: int, space: int, run: bool, use: int) -> dict:
  """One row: compile (and, with `run`, time) the step; memory per device and throughput."""
  import jax

  from cxr_jax.core.run import sharding
  from cxr_jax.core.run import utilisation

  config = _config(args, size, global_batch, space)
  devices = jax.devices()[:use] if jax.process_count() == 1 else None
  mesh = sharding.create_mesh(config.mesh, devices=devices)
  t0 = time.perf_counter()
  compiled, state, batch = _compiled_step(config, mesh, abstract=not run)
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  row = {
    "devices": mesh.devices.size,
    "processes": jax.process_count(),
    "space": space,
    "size": size,
    "global_batch": global_batch,
    "compile_s": compile_s,
    "memory_mb": (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      + memory.temp_size_in_bytes
      - memory.alias_size_in_bytes
    )
    / 2**20,  # fmt: skip
    "device_kind": jax.devices()[0].device_kind,
  }
  if run:
    state, scalars = compiled(state, batch)  # warm-up
    scalars["loss"].block_until_ready()
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, scalars = compiled(state, batch)
    scalars["loss"].block_until_ready()
    step_s = (time.perf_counter() - t0) / args.steps
    row.update(step_s=step_s, images_per_s=global_batch / step_s)
    flops = utilisation.step_flops(compiled)
    row.update(utilisation.utilisation(flops, 1 / step_s, row["device_kind"]))
  return row


def child(args) -> None:
  spec = json.loads(args.child)
  if spec.get("coordinator"):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(spec["coordinator"], num_processes=spec["processes"],
                               process_id=spec["process_id"])  # fmt: skip
  row = measure(args, spec["size"], spec["global_batch"], spec["space"], spec["run"],
                spec["devices"])  # fmt: skip
  print("ROW " + json.dumps(row), flush=True)


# ----- the parent: one process per row -----


def _spawn(args, spec: dict, devices: int, processes: int = 1) -> dict:
  spec = dict(spec, devices=devices)
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  if not args.accelerator:
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices // processes}")  # fmt: skip
  common = [sys.executable, __file__, *sys.argv[1:]]
  if processes == 1:
    procs = [subprocess.Popen([*common, f"--child={json.dumps(spec)}"], env=env,
                              stdout=subprocess.PIPE, text=True)]  # fmt: skip
  else:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    procs = [
      subprocess.Popen(
        [
          *common,
          "--child="
          + json.dumps(
            dict(spec, coordinator=f"127.0.0.1:{port}", processes=processes, process_id=i)
          ),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
      )  # fmt: skip
      for i in range(processes)
    ]
  outputs = [p.communicate(timeout=args.timeout)[0] for p in procs]
  if any(p.returncode for p in procs):
    return {"error": f"exit {[p.returncode for p in procs]}"}
  return json.loads(outputs[0].split("ROW ", 1)[1])


def _table(title: str, header: list[str], rows: list[list]) -> str:
  lines = [f"\n**{title}**\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def _mfu(row: dict) -> str:
  return f"{row['mfu']:.1%}" if "mfu" in row else "n/a"


def data_parallel(args) -> None:
  counts = [int(n) for n in args.devices.split(",")]
  layouts = [(n, 1) for n in counts] + ([(4, 2)] if args.procs and not args.accelerator else [])
  for kind in ("weak", "strong"):
    rows, base = [], None
    for devices, processes in layouts:
      batch = args.per_device_batch * devices if kind == "weak" else args.global_batch
      if batch % devices:
        continue
      row = _spawn(args, dict(size=args.size, global_batch=batch, space=1, run=True), devices,
                   processes)  # fmt: skip
      if "error" in row:
        rows.append([devices, processes, batch, row["error"], "", "", ""])
        continue
      base = base or row["images_per_s"] / devices  # one device's images/s
      per_device = row["images_per_s"] / devices
      rows.append([devices, processes, batch, f"{row['images_per_s']:.2f}", f"{per_device:.2f}",
                   f"{per_device / base:.0%}", _mfu(row)])  # fmt: skip
    what = (f"{args.per_device_batch} images per device" if kind == "weak"
            else f"global batch {args.global_batch}")  # fmt: skip
    print(_table(f"{kind.capitalize()} scaling, {args.model} {args.size} px, {what}",
                 ["devices", "processes", "global batch", "images/s", "per device",
                  "efficiency", "MFU"], rows), flush=True)  # fmt: skip


def spatial(args) -> None:
  sides = [int(s) for s in args.sides.split(",")]
  rows = []
  for space in [int(s) for s in args.spaces.split(",")]:
    largest, memory = None, {}
    for side in sides:
      row = _spawn(args, dict(size=side, global_batch=1, space=space, run=False), space)
      if "error" in row:
        break
      memory[side] = row["memory_mb"]
      if row["memory_mb"] > args.budget_mb:
        break
      largest = side
    timed = _spawn(args, dict(size=args.fixed_side, global_batch=1, space=space, run=True), space)
    step = f"{timed['step_s']:.2f}" if "step_s" in timed else timed.get("error")
    rows.append([space, largest or f"< {sides[0]}",
                 ", ".join(f"{s}: {m:.0f}" for s, m in memory.items()),
                 step, _mfu(timed)])  # fmt: skip
  print(_table(f"Spatial scaling, {args.model} base {args.base_features}, batch 1, budget "
               f"{args.budget_mb:.0f} MB per device",
               ["space", "largest side", "MB per device by side", f"step s at {args.fixed_side}",
                "MFU"], rows), flush=True)  # fmt: skip


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="data,spatial")
  parser.add_argument("--model", default="unet")
  parser.add_argument("--base_features", type=int, default=8)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--size", type=int, default=128, help="side for data-parallel rows")
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--procs", type=int, default=1, help="also 2 processes x 2 devices")
  parser.add_argument("--per_device_batch", type=int, default=2)
  parser.add_argument("--global_batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--spaces", default="1,2,4")
  parser.add_argument("--sides", default="256,512,768,1024,1536,2048,3072,4096")
  parser.add_argument("--budget_mb", type=float, default=1024)
  parser.add_argument("--fixed_side", type=int, default=512)
  parser.add_argument("--accelerator", action="store_true", help="the host's real devices")
  parser.add_argument("--timeout", type=float, default=1800)
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  print(f"benchmarks/scaling.py {' '.join(sys.argv[1:])}")
  if "data" in args.parts:
    data_parallel(args)
  if "spatial" in args.parts:
    spatial(args)


if __name__ == "__main__":
  main()
