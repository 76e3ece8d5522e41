"""How busy the devices are: FLOPs of a compiled step, utilisation against a device's peak,
the compilation cache's hits, and profiler traces.

Peaks are dense bfloat16 matrix FLOP/s per chip or GPU, from the vendors' data sheets (the
convention of MFU tables, e.g. MaxText's); a float32 model reads lower against them. Unknown
devices (CPUs) have no peak, and no MFU is reported.
"""

import logging
import shutil
import tempfile
from typing import Any, NamedTuple

import jax

from cxr_jax.core.run.layout import RunDir
from cxr_jax.data import paths


class Chip(NamedTuple):
  """One accelerator of a kind: its peak dense bf16 FLOP/s, and (TPUs, which `cxr_jax.aot`
  compiles for) its HBM capacity in GiB and bandwidth in GB/s."""

  peak_flops: float
  hbm_gib: float | None = None
  hbm_gbps: float | None = None


# device_kind substring (lower case) -> Chip, from the vendors' data sheets. Checked in this
# order ('v5 lite', v5e's device_kind, before 'v5', v5p's).
CHIPS = (
  ("h100 pcie", Chip(756e12)),
  ("h100", Chip(989e12)),
  ("h200", Chip(989e12)),
  ("b200", Chip(2250e12)),
  ("a100", Chip(312e12)),
  ("l40s", Chip(362e12)),
  ("l40", Chip(181e12)),
  ("l4", Chip(121e12)),
  ("v6 lite", Chip(918e12, 32, 1640)),
  ("v6e", Chip(918e12, 32, 1640)),
  ("v5 lite", Chip(197e12, 16, 819)),
  ("v5e", Chip(197e12, 16, 819)),
  ("v5p", Chip(459e12, 95, 2765)),
  ("v5", Chip(459e12, 95, 2765)),
  ("v4", Chip(275e12, 32, 1200)),
)


def chip(device_kind: str) -> Chip | None:
  """The table's row for a device kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), or None."""
  kind = device_kind.lower()
  for name, row in CHIPS:
    if name in kind:
      return row
  return None


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of this kind, or None when unknown."""
  row = chip(device_kind)
  return row.peak_flops if row else None


def step_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled (AOT) function, per device, from XLA's cost analysis."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def utilisation(
  flops_per_step: float | None, steps_per_sec: float, device_kind: str
) -> dict[str, float]:
  """{'tflops_per_device': achieved, 'mfu': fraction of the peak} (each where known)."""
  if not flops_per_step:
    return {}
  achieved = flops_per_step * steps_per_sec
  out = {"tflops_per_device": achieved / 1e12}
  peak = peak_flops(device_kind)
  if peak:
    out["mfu"] = achieved / peak
  return out


class CompilationCacheEvents:
  """Counts the persistent compilation cache's hits and misses (jax.monitoring events) while
  open: `with CompilationCacheEvents() as cache: <compile>`, then `cache.describe()`. Each
  object listens with its own counts, and stops listening on exit."""

  _HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"

  def __init__(self):
    self.hits = self.misses = 0

  def _listen(self, event: str, **kwargs) -> None:
    del kwargs
    self.hits += event == self._HIT
    self.misses += event == self._MISS

  def __enter__(self) -> "CompilationCacheEvents":
    jax.monitoring.register_event_listener(self._listen)
    return self

  def __exit__(self, *exc_info) -> None:
    jax.monitoring.unregister_event_listener(self._listen)

  def describe(self) -> str:
    """'compilation cache: 1 hit(s), 0 miss(es)', or 'not used', while it was open."""
    hits, misses = self.hits, self.misses
    if not hits and not misses:
      return "compilation cache not used"
    return f"compilation cache: {hits} hit(s), {misses} miss(es)"


class ProfileWindow:
  """A jax.profiler trace of steps [start, stop] into DIR/profile (process 0 only)."""

  def __init__(self, start: int, stop: int, logdir: str):
    self.start, self.stop, self.logdir, self.active = start, stop, logdir, False
    self._local = ""

  def before(self, step: int) -> None:
    if step == self.start and jax.process_index() == 0:
      # The profiler writes files: for a bucket, on local disk, uploaded at the end.
      self._local = tempfile.mkdtemp(prefix="cxr_jax_profile_") if paths.is_url(self.logdir) else ""
      jax.profiler.start_trace(self._local or self.logdir)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step == self.stop:
      jax.block_until_ready(state)
      self.close()
      logging.info(
        "Profile of steps %d-%d written to %s (TensorBoard's profile tab).",
        self.start,
        self.stop,
        self.logdir,
      )

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      if self._local:
        paths.upload_tree(self._local, self.logdir)
        shutil.rmtree(self._local, ignore_errors=True)


def profile_window(profile_steps: str, workdir: str) -> ProfileWindow:
  """config.profile_steps 'A-B' (e.g. '10-15'; '' for none) as a profile window."""
  text = str(profile_steps or "")
  if not text:
    return ProfileWindow(0, -1, "")
  try:
    start, stop = (int(x) for x in text.split("-"))
  except ValueError:
    start, stop = 0, -1
  if not 1 <= start <= stop:
    raise ValueError(
      f"config.profile_steps={text!r}: expected FIRST-LAST steps, e.g. "
      "--config.profile_steps=10-15."
    )
  return ProfileWindow(start, stop, str(RunDir(workdir).profile))
