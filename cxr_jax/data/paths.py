"""Paths a user gives: a local path or a URL such as gs://bucket/run (etils.epath opens both).

`resolve` makes a local path absolute ('~' expanded) and keeps a URL as it is, so the rest of
the code joins strings and opens them with `epath.Path`: one code path for a disk and a
bucket. What a library cannot write into a bucket (TFDS's array_record files, the profiler's
trace) is written on local disk and copied up with `upload_tree`; what it cannot read from
one is copied down first with `download_tree` into a per-host cache (`cache_dir`).
Reading gs:// needs gcsfs (`pip install "cxr_jax[gcs]"`).
"""

import hashlib
import os
import shutil
import tempfile

from etils import epath

CACHE_ENV = "CXR_JAX_CACHE"  # where per-host copies of remote data go (~/.cache/cxr_jax)


def is_url(path: str | os.PathLike) -> bool:
  """gs://..., s3://... (not a local path)."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path ('~' expanded), or the URL without a trailing '/'."""
  path = os.fspath(path)
  if is_url(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def write_text(path: str, text: str) -> None:
  """Writes `path` whole: on a disk through a temporary file and a rename, so a reader (or
  a kill) never sees half of it; an object in a bucket is replaced whole by one upload."""
  if is_url(path):
    epath.Path(path).write_text(text)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def cache_dir(url: str, kind: str) -> str:
  """This host's directory for a local copy of `url` (one per URL)."""
  root = os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/cxr_jax")
  digest = hashlib.sha256(resolve(url).encode()).hexdigest()[:16]
  return os.path.join(root, kind, f"{os.path.basename(resolve(url))}-{digest}")


def upload_tree(local_dir: str, url: str) -> int:
  """Copies every file under `local_dir` to the same place under `url`; returns the count."""
  count = 0
  for root, _, files in os.walk(local_dir):
    target = epath.Path(url) / os.path.relpath(root, local_dir)
    for name in files:
      (target / name).write_bytes(epath.Path(root, name).read_bytes())
      count += 1
  return count


def download_tree(url: str, local_dir: str) -> str:
  """Copies the folder or file `url` into `local_dir` (replacing it), complete or not at all:
  into a temporary folder beside it first, renamed into place at the end. Returns the local
  copy of `url`: `local_dir`, or the file inside it."""
  src = epath.Path(url)
  parent = os.path.dirname(os.path.abspath(local_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".download-")
  try:
    is_dir = src.is_dir()
    _copy_down(src, tmp) if is_dir else _copy_down_file(src, os.path.join(tmp, src.name))
    shutil.rmtree(local_dir, ignore_errors=True)
    os.rename(tmp, local_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return local_dir if is_dir else os.path.join(local_dir, src.name)


def _copy_down(src: epath.Path, local_dir: str) -> None:
  # iterdir, not walk: epath's walk yields bucket paths without their gs:// scheme.
  os.makedirs(local_dir, exist_ok=True)
  for child in src.iterdir():
    target = os.path.join(local_dir, child.name)
    _copy_down(child, target) if child.is_dir() else _copy_down_file(child, target)


def _copy_down_file(src: epath.Path, target: str) -> None:
  with open(target, "wb") as f:
    f.write(src.read_bytes())
