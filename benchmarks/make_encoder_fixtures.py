"""Writes tests/fixtures/encoders: what the real PyTorch libraries compute, for CI without torch.

For torchvision's resnet18/34/50 and densenet121, timm's resnet34 and TorchXRayVision's
DenseNet-121 (built with weights=None: nothing is downloaded) it saves the state dict's
schema (key -> shape) and, for the deterministic random weights of tests/encoder_weights.py
loaded into the real module in eval mode, its logits and the channel means of the five
features a U-Net takes (strides 2..32) on a fixed grey image (RGB models see it in R, G, B).
It also saves a tiny torchvision DenseNet (growth 4, one layer per block) with torch.save
(.pth) and safetensors (.safetensors), with its outputs: real files of both formats.

  pip install torch torchvision timm safetensors torchxrayvision   # CPU wheels
  python benchmarks/make_encoder_fixtures.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
import torchvision
import torchxrayvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import encoder_weights  # noqa: E402 (after the path it needs)


def build(name: str) -> torch.nn.Module:
  """The reference module of fixture `name`, random weights, eval mode."""
  if name.startswith("torchvision_"):
    return getattr(torchvision.models, name.removeprefix("torchvision_"))(weights=None)
  if name == "timm_resnet34":
    return timm.create_model("resnet34", pretrained=False)
  if name == "torchxrayvision_densenet121":
    return torchxrayvision.models.DenseNet(weights=None)
  raise ValueError(name)


def stage_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
  """The modules whose outputs are the features at strides 2, 4, 8, 16, 32."""
  if hasattr(model, "layer1"):  # ResNet: after the stem's ReLU, then each stage
    return [model.act1 if hasattr(model, "act1") else model.relu] + [
      getattr(model, f"layer{i}") for i in range(1, 5)
    ]
  f = model.features  # DenseNet: stem ReLU, each transition's conv (before pooling), norm5
  return [f.relu0, f.transition1.conv, f.transition2.conv, f.transition3.conv, f.norm5]


def reference_outputs(model: torch.nn.Module, image: np.ndarray, channels: int) -> dict:
  """Logits and per-stage channel means [B, C] of `model` on grey `image` [B, H, W]."""
  captured = []
  hooks = [
    m.register_forward_hook(lambda _m, _i, out: captured.append(out.mean(dim=(2, 3))))
    for m in stage_modules(model)
  ]
  x = torch.from_numpy(image)[:, None].repeat(1, channels, 1, 1)
  with torch.no_grad():
    if hasattr(model, "features2"):  # TorchXRayVision: logits before its sigmoid
      logits = model.classifier(model.features2(x))
    else:
      logits = model(x)
  for hook in hooks:
    hook.remove()
  # torchvision's ResNet calls its one ReLU module several times: the stem's is the first.
  stages = [captured[0]] + captured[-4:]
  out = {"logits": logits.numpy()}
  out.update({f"stage{i}": s.numpy() for i, s in enumerate(stages)})
  return out


def main() -> None:
  out_dir = encoder_weights.FIXTURES
  out_dir.mkdir(parents=True, exist_ok=True)
  image = encoder_weights.test_image()
  for seed, (name, (_, _, channels)) in enumerate(encoder_weights.MODELS.items()):
    model = build(name).eval()
    schema = {k: list(v.shape) for k, v in model.state_dict().items()}
    weights = encoder_weights.random_state_dict(schema, seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    outputs = reference_outputs(model, image, channels)
    meta = {"seed": seed, "torch": torch.__version__, "schema": schema}
    (out_dir / f"{name}.json").write_text(json.dumps(meta))
    np.savez_compressed(out_dir / f"{name}.npz", **outputs)
    print(name, len(schema), "keys", {k: v.shape for k, v in outputs.items()})
  tiny = torchvision.models.DenseNet(
    growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8, bn_size=2, num_classes=5
  ).eval()
  torch.manual_seed(0)
  for module in tiny.modules():  # non-trivial batch statistics
    if isinstance(module, torch.nn.BatchNorm2d):
      module.running_mean.normal_(0, 0.1)
      module.running_var.uniform_(0.5, 1.5)
  torch.save(tiny.state_dict(), out_dir / "tiny_densenet.pth")
  safetensors.torch.save_file(tiny.state_dict(), str(out_dir / "tiny_densenet.safetensors"))
  np.savez_compressed(out_dir / "tiny_densenet.npz", **reference_outputs(tiny, image, 3))


if __name__ == "__main__":
  main()
