"""`python -m cxr_jax.sweep --sweep=configs/sweeps/NAME.py --root=DIR [--parallel=N]`

Runs every (variant, seed, fold) of a sweep into DIR/<variant>/seed<s>[_fold<f>]: trains
(`cxr_jax.main`, which resumes a half-finished run), then evaluates on the held-out split.
Finished runs are skipped, so the same command continues an interrupted sweep. Then writes
DIR/results.{csv,md,html} (`cxr_jax.results`). `--print_commands` prints the runs' command
lines instead; `--print_commands=slurm` an sbatch array script that runs one run per task
(`--run_index`).
"""

import concurrent.futures
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading

from absl import app
from absl import flags
from etils import epath

from cxr_jax import cli
from cxr_jax import errors
from cxr_jax import results
from cxr_jax.core.run.layout import RunDir
from cxr_jax.data import paths
from cxr_jax.workflows import sweeps


def load_sweep(path: str) -> sweeps.Sweep:
  """The `Sweep` that `get_sweep()` in the file at `path` returns."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--sweep={path!r} does not exist (e.g. configs/sweeps/attention.py)")
  spec = importlib.util.spec_from_file_location("cxr_jax_sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_sweep()
  if not isinstance(sweep, sweeps.Sweep):
    raise TypeError(f"{path}: get_sweep() must return a cxr_jax.workflows.sweeps.Sweep")
  return sweep


PREEMPTED = 143  # a run that stopped before its last step, as after SIGTERM


class _Children:
  """The sweep's live training and evaluation processes. SIGTERM to the sweep (scancel, a
  spot reclaim, `kill`) is passed on to them: a training saves its step and exits, the
  sweep waits for it, starts nothing more and exits 143; the same command resumes."""

  def __init__(self):
    self.live: set[subprocess.Popen] = set()
    self.lock = threading.Lock()
    self.stopping = False

  def run(self, command: list[str], **kwargs) -> int:
    with self.lock:
      if self.stopping:
        return PREEMPTED
      child = subprocess.Popen(command, **kwargs)
      self.live.add(child)
    try:
      return child.wait()
    finally:
      with self.lock:
        self.live.discard(child)

  def terminate(self, signum: int, frame) -> None:
    del frame
    with self.lock:
      self.stopping = True
      for child in self.live:
        child.send_signal(signum)
    print(
      f"sweep: {signal.Signals(signum).name}: passed to {len(self.live)} running "
      "process(es); waiting for them to save (the same command resumes)",
      file=sys.stderr,
    )


CHILDREN = _Children()


def run_one(
  sweep: sweeps.Sweep,
  sweep_file: str,
  run: sweeps.Run,
  root: str,
  env: dict[str, str] | None = None,
) -> tuple[str, int]:
  """Trains and evaluates one run unless it is done; (its name, exit status)."""
  workdir = sweeps.run_dir(root, run)
  try:
    if sweeps.is_done(workdir, sweep.split):
      return run.name, 0
  except errors.UserError as e:  # this run's files are damaged: the others still run
    print(f"sweep: {run.name}: {e}", file=sys.stderr)
    return run.name, 2
  sweeps.write_run_record(workdir, sweep_file, run)
  train, *evaluations = sweeps.commands(sweep, run, workdir)
  for command in (train, *evaluations):
    status = _run_logged(command, env, workdir.sweep_log)
    if status:
      return run.name, status
    if command is train and not sweeps.is_trained(workdir):
      return run.name, PREEMPTED  # stopped early (SIGTERM): rerun to finish it
  return run.name, 0


def _run_logged(command: list[str], env: dict[str, str] | None, log: epath.Path) -> int:
  """Runs `command` (as one of `CHILDREN`) with its output appended to `log`: on a disk as it
  comes; in a bucket, where objects cannot be appended to, once it ends."""
  header = f"$ {shlex.join(command)}\n"
  if not paths.is_url(str(log)):
    with open(log, "a") as f:
      f.write(header)
      f.flush()
      return CHILDREN.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
  with tempfile.TemporaryFile("w+") as f:
    status = CHILDREN.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    f.seek(0)
    before = log.read_text() if log.exists() else ""
    log.write_text(before + header + f.read())
  return status


def _done(run_dir: RunDir, split: str) -> bool:
  """`sweeps.is_done`, False for a run whose files cannot be read (run_one says why)."""
  try:
    return sweeps.is_done(run_dir, split)
  except errors.UserError:
    return False


def slurm_script(args, count: int) -> str:
  command = shlex.join(
    [sys.executable, "-m", "cxr_jax.sweep", f"--sweep={args.sweep}", f"--root={args.root}"]
    + [f"--override={text}" for text in args.override]
  )
  return (
    f"#!/usr/bin/env bash\n#SBATCH --array=0-{count - 1}\n#SBATCH --job-name=cxr_sweep\n"
    f'{command} --run_index="$SLURM_ARRAY_TASK_ID" --results=false\n'
  )


def _parse_override(text: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise app.UsageError(f"--override={text!r}: expected KEY=VALUE, e.g. data.manual_dir=/data")
  return key, value


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  sweep = load_sweep(args.sweep)
  extra = dict(_parse_override(text) for text in args.override)
  overridden = sweeps.with_overrides(sweep, extra)
  if overridden.folds != sweep.folds:
    print(
      f"sweep: --override=data.split={extra['data.split']} replaces the sweep's {sweep.folds} folds"
    )
  sweep = overridden
  runs = sweeps.expand(sweep)
  if args.print_commands == "slurm":
    print(slurm_script(args, len(runs)), end="")
    return
  if args.print_commands:
    for run in runs:
      for command in sweeps.commands(sweep, run, sweeps.run_dir(args.root, run)):
        print(shlex.join(command))
    return
  if args.run_index is not None:
    runs = [runs[args.run_index]]
  todo = [r for r in runs if not _done(sweeps.run_dir(args.root, r), sweep.split)]
  print(
    f"sweep: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run "
    f"({args.parallel} at a time) in {args.root}",
    file=sys.stderr,
  )
  failed = []
  env = dict(os.environ)
  if args.parallel > 1:  # runs sharing one accelerator: each takes its share of its memory
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.parallel:.2f}")
  signal.signal(signal.SIGTERM, CHILDREN.terminate)
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
    for name, status in pool.map(lambda r: run_one(sweep, args.sweep, r, args.root, env), todo):
      state = {0: "done", PREEMPTED: "stopped early (rerun to finish)"}.get(status)
      print(f"sweep: {name} {state or f'FAILED ({status})'}", file=sys.stderr)
      if status:
        failed.append(name)
  if failed:
    print(
      f"sweep: {len(failed)} not done (their sweep.log says why): {', '.join(failed)}",
      file=sys.stderr,
    )
  if CHILDREN.stopping:
    sys.exit(PREEMPTED)
  if args.results and args.run_index is None and len(failed) < len(runs):
    written = results.write_results(
      args.root,
      [sweeps.run_dir(args.root, r) for r in runs],
      baseline=sweeps.baseline(sweep),
      split=sweep.split,
    )
    print(f"sweep: wrote {', '.join(written)}", file=sys.stderr)
  if failed:
    sys.exit(1)


def define_flags() -> None:
  flags.DEFINE_string("sweep", None, "A sweep file, e.g. configs/sweeps/attention.py.")
  flags.DEFINE_string("root", None, "Folder of the sweep's run directories.")
  flags.DEFINE_integer("parallel", 1, "Runs at a time.", lower_bound=1)
  flags.DEFINE_string(
    "print_commands",
    "",
    "'1': print the runs' commands; 'slurm': an sbatch array script; nothing is run.",
  )
  flags.DEFINE_multi_string(
    "override",
    [],
    "KEY=VALUE set in every run (after the sweep "
    "file's), e.g. --override=data.manual_dir=/data/archive.",
  )
  flags.DEFINE_integer("run_index", None, "Run only this run of the sweep (SLURM arrays).")
  flags.DEFINE_bool("results", True, "Write DIR/results.* once the runs are done.")
  flags.mark_flags_as_required(["sweep", "root"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
