"""A restored model's forward pass, and the mapping of its outputs back to native images."""

import dataclasses
import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.scipy import ndimage

from cxr_jax.core.inference import postprocess
from cxr_jax.core.run import platform
from cxr_jax.core.run import sharding
from cxr_jax.core.training import heads
from cxr_jax.data import crops as crops_lib
from cxr_jax.data import preprocess

MASK_THRESHOLD = 0.5  # on the probability, after mapping it back to the native size

# config.tta: the views averaged, (zoom, rows, cols): zoom about the centre, then a shift in
# units of side/32 px. Identity first; small enough that the lungs stay inside the square.
TTA_VIEWS = (
  (1.0, 0, 0),
  (1.0, 1, 0),
  (1.0, -1, 0),
  (1.0, 0, 1),
  (1.0, 0, -1),
  (0.94, 0, 0),
  (1.06, 0, 0),
)


def _view_coords(size: int, zoom: float, rows: int, cols: int, inverse: bool) -> jax.Array:
  """[2, S, S] sampling coordinates of a view (or, inverse=True, of its way back)."""
  centre = (size - 1) / 2
  shift = jnp.asarray([rows, cols], jnp.float32)[:, None, None] * size / 32
  grid = jnp.stack(jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij")).astype(
    jnp.float32
  )
  if inverse:  # view pixel y shows image point c + (y - c - t) / z, so x maps to c + z(x-c) + t
    return centre + zoom * (grid - centre) + shift
  return centre + (grid - centre - shift) / zoom


def _warp(image: jax.Array, coords: jax.Array, cval_min: bool) -> jax.Array:
  """[S, S] bilinear resampling; outside the square: the image's minimum, or 0."""
  low = jnp.where(cval_min, image.min(), 0.0)
  return ndimage.map_coordinates(image - low, list(coords), order=1, mode="constant") + low


def tta_probability(forward, images: jax.Array, identity: jax.Array | None = None) -> jax.Array:
  """p(lung) [B, S, S] averaged over TTA_VIEWS: each view's image through `forward`
  ([N, S, S, 1] -> [N, S, S]) and its probability mapped back to the square. `identity`:
  the first (identity) view's p(lung) when the caller has it already (not run again)."""
  batch, size = images.shape[0], images.shape[1]
  run = TTA_VIEWS if identity is None else TTA_VIEWS[1:]
  views = []
  for zoom, rows, cols in run:
    coords = _view_coords(size, zoom, rows, cols, inverse=False)
    views.append(jax.vmap(_warp, in_axes=(0, None, None))(images[..., 0], coords, True))
  probs = forward(jnp.concatenate(views)[..., None])
  back = [] if identity is None else [identity]
  for k, (zoom, rows, cols) in enumerate(run):
    coords = _view_coords(size, zoom, rows, cols, inverse=True)
    view = probs[k * batch : (k + 1) * batch]
    back.append(jax.vmap(_warp, in_axes=(0, None, None))(view, coords, False))
  return jnp.mean(jnp.stack(back), axis=0)


def segmenter_outputs(model, outputs: dict, images: jax.Array, tta: bool) -> dict:
  """`heads.probabilities` of a model's `outputs` on `images`; for a segmenter p(lung) is
  averaged over TTA_VIEWS (`model` runs again on the six others) when `tta`, and 'uncertainty' added."""
  result = heads.probabilities(outputs)
  if "prob" in result:
    if tta:
      result["prob"] = tta_probability(
        lambda x: heads.probabilities(model(x))["prob"], images, identity=result["prob"]
      )
    result["uncertainty"] = uncertainty(result["prob"])
  return result


def uncertainty(prob: jax.Array) -> jax.Array:
  """Per image [B]: the binary entropy of p(lung) summed over pixels, per pixel of predicted
  lung (mean boundary entropy: the uncertain band's width relative to the lungs' size). Under
  TTA the views' disagreement widens the band. An empty mask scores 1: worth a look."""
  p = jnp.clip(prob, 1e-6, 1 - 1e-6)
  entropy = -(p * jnp.log(p) + (1 - p) * jnp.log1p(-p)) / jnp.log(2.0)
  area = (prob >= MASK_THRESHOLD).sum(axis=(1, 2))
  return jnp.where(area > 0, entropy.sum(axis=(1, 2)) / jnp.maximum(area, 1), 1.0)


def make_predict_step(graphdef: nnx.GraphDef, *, tta: bool, attention: bool = False):
  """Returns `predict_step(state, images [B, S, S, 1] float32) -> dict` (`Inference`'s
  outputs); pure, ready for jax.jit. `state`: the model's variables (`nnx.split`), all of
  them; `attention=True` adds the attention gates' maps (a model that has them)."""
  kwargs = {"return_attention": True} if attention else {}

  def predict_step(state: nnx.State, images: jax.Array) -> dict:
    model = nnx.merge(graphdef, state)
    outputs = model(images, train=False, **kwargs)
    result = segmenter_outputs(lambda x: model(x, train=False), outputs, images, tta)
    if "attention" in outputs:
      result["attention"] = [a[..., 0] for a in outputs["attention"]]
    return result

  return predict_step


class Inference:
  """A restored model's jitted forward pass on letterboxed batches of fixed size.

  `__call__(images [B, S, S, 1] float32)` (B <= batch_size; padded inside so one shape is
  compiled) -> dict of numpy arrays: 'prob' [B, S, S] lung probability (segmenters; averaged
  over TTA_VIEWS when `config.tta`), 'uncertainty' [B] (segmenters, `uncertainty`),
  'p_abnormal' [B] (classifiers), 'attention' list of [B, s, s] gate maps (Attention U-Net,
  when `attention=True`).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: nnx.Module,
    *,
    batch_size: int,
    attention: bool = False,
  ):
    self.config = config
    self.image_size = int(config.data.image_size)
    self.batch_size = batch_size
    call_params = inspect.signature(type(model).__call__).parameters
    self.has_attention = "return_attention" in call_params
    graphdef, state = nnx.split(model)
    # config.mesh.space > 1: each image's height split over this host's devices (`sharding`),
    # for sizes one device cannot hold; batches padded to a multiple of the 'data' axis.
    self._padded_batch, shardings = batch_size, {}
    space = int(config.mesh.space)
    if space > 1:
      mesh = sharding.create_mesh({"space": space}, devices=jax.local_devices())
      sharding.check_image_size(self.image_size, mesh)
      data = int(mesh.shape[sharding.DATA_AXIS])
      self._padded_batch = -(-batch_size // data) * data
      shardings["in_shardings"] = (sharding.replicated(mesh), sharding.image_sharded(mesh))

    self.tta = bool(config.tta)
    self.qc_threshold = float(config.qc_threshold)

    forward = platform.jit(
      make_predict_step(graphdef, tta=self.tta, attention=attention and self.has_attention),
      **shardings,
    )
    self._state = state
    self._forward = forward
    probe = jax.eval_shape(
      forward, state, jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 1), np.float32)
    )
    self.heads = [head for head in heads.HEADS if head.probability_key in probe]
    self.segments = "prob" in probe
    self.classifies = "p_abnormal" in probe

  def __call__(self, images: np.ndarray) -> dict:
    images = np.asarray(images, np.float32)
    count = images.shape[0]
    if count > self.batch_size:
      raise ValueError(f"batch of {count} > batch_size {self.batch_size}")
    padded = np.zeros((self._padded_batch,) + images.shape[1:], np.float32)
    padded[:count] = images
    outputs = jax.device_get(self._forward(self._state, padded))
    return jax.tree.map(lambda x: np.asarray(x)[:count], outputs)


def native_mask(prob: np.ndarray, letterbox: preprocess.Letterbox, *, clean: bool) -> np.ndarray:
  """A segmenter's p(lung) [S, S] (letterboxed) -> the mask at the native size, bool [H, W].

  The one mapping from model output to a native mask (prediction, evaluation and lung
  crops): bilinear `unletterbox` of the probability, then `>= MASK_THRESHOLD`; clean=True
  then applies `postprocess.clean_mask` (two largest components, holes filled), i.e.
  `native_mask(..., clean=True) == postprocess.clean_mask(native_mask(..., clean=False))`.
  """
  mask = preprocess.unletterbox(prob, letterbox, order="bilinear") >= MASK_THRESHOLD
  return postprocess.clean_mask(mask) if clean else mask


@dataclasses.dataclass
class Prediction:
  """One image's outputs at its native size."""

  height: int
  width: int
  mask: np.ndarray | None  # bool [H, W], raw (thresholded); None when nothing segments
  mask_post: np.ndarray | None  # bool [H, W], post-processed; None unless asked for
  p_abnormal: float | None
  crop: tuple[int, int, int, int] | None = None  # lung crop the classifier saw (top, left,
  # bottom, right); None: the whole image
  uncertainty: float | None = None  # the segmenter's `uncertainty` (None: nothing segments)

  @property
  def output_mask(self) -> np.ndarray | None:
    """The mask written to masks/: post-processed when it was asked for, else raw."""
    return self.mask_post if self.mask_post is not None else self.mask


def predict_images(
  inference: Inference,
  images: Sequence[np.ndarray],
  *,
  clean: bool = False,
  lungs: Sequence[tuple[np.ndarray, crops_lib.Box | None]] | None = None,
  margin: float = 0.0,
) -> list[Prediction]:
  """Predicts native grey images [H, W] (one batch at most `inference.batch_size`).

  With `lungs` (a segmenter's (raw lung mask, lung box) per image, for a run trained on lung
  crops) each image is first cropped to its lung box grown by `margin`, as in training; the
  mask reported is then the model's own mask pasted back into the native frame (multitask)
  or else the segmenter's lungs, the mask the crop came from.
  """
  size = inference.image_size
  crops: list[crops_lib.Box | None] = [None] * len(images)
  masks: list[np.ndarray | None] = [None] * len(images)
  if lungs is not None:
    for k, (image, (raw, box)) in enumerate(zip(images, lungs)):
      masks[k] = raw
      if box is not None:
        crops[k] = crops_lib.grow_box(box, margin, *image.shape[:2])
  views = [
    image if c is None else image[c[0] : c[2], c[1] : c[3]] for image, c in zip(images, crops)
  ]
  prepared = [preprocess.prepare_image(view, size) for view in views]
  outputs = inference(np.stack([x for x, _ in prepared])[..., None])
  results = []
  for i, (image, crop, (_, box)) in enumerate(zip(images, crops, prepared)):
    height, width = image.shape[:2]
    mask = masks[i]
    if inference.segments:
      mask = native_mask(outputs["prob"][i], box, clean=False)
      if crop is not None:  # back into the full image's frame: no lung outside the crop
        canvas = np.zeros((height, width), bool)
        canvas[crop[0] : crop[2], crop[1] : crop[3]] = mask
        mask = canvas
    mask_post = postprocess.clean_mask(mask) if (clean and mask is not None) else None
    p = float(outputs["p_abnormal"][i]) if inference.classifies else None
    u = float(outputs["uncertainty"][i]) if inference.segments else None
    results.append(Prediction(height, width, mask, mask_post, p, crop, u))
  return results
