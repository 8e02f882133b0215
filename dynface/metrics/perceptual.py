"""LPIPS (VGG, v0.1) and DISTS on our own VGG16 definition: no torchvision, nothing downloaded.

Both need ImageNet VGG16 weights the user supplies: torchvision's `vgg16-397923af.pth` (only its
`features.*` tensors are read). The small learned heads ship inside registry packages:
* LPIPS's linear layers: `lpips/weights/v0.1/vgg.pth` of the `lpips` package (keys `lin{k}.model.1.weight`);
* DISTS's α/β: `DISTS_pytorch/weights.pt` of the `dists-pytorch` package (keys `alpha`, `beta`).
`default_head_path` finds them in an installed package without importing it (both packages import
torchvision, which does not load beside our torch build); any other path can be given.

Definitions (Zhang et al. 2018; Ding et al. 2020):
* LPIPS: inputs in [0, 1] mapped to [−1, 1], shifted/scaled per channel, VGG16 relu1_2 … relu5_3;
  each feature unit-normalised over channels; squared difference weighted per channel by the linear
  layer, averaged over space and summed over the five layers. Lower is closer; 0 for equal images.
* DISTS: ImageNet-normalised inputs, VGG16 with max pooling replaced by L2 pooling (3×3 Hann window,
  stride 2); for the input itself and the five stages, per channel: structure
  S1 = (2μxμy + c)/(μx² + μy² + c) and texture S2 = (2σxy + c)/(σx² + σy² + c), c = 1e-6, weighted by
  α and β normalised to sum 1; DISTS = 1 − Σ(αS1 + βS2). Lower is closer; 0 for equal images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynface.checkpoints import load_state_dict

# torchvision's VGG16 "D" configuration; "M" = 2×2 max pooling. Indices of `features` match
# torchvision's, so the state dict of its ImageNet file loads as is.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
# The five feature taps (relu1_2 … relu5_3) end after these `features` indices; pools sit between.
_STAGE_ENDS = (3, 8, 15, 22, 29)
STAGE_CHANNELS = (64, 128, 256, 512, 512)

_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DISTS_C = 1e-6

HeadKind = Literal["lpips", "dists"]
_HEAD_FILES: dict[str, tuple[str, str]] = {
    "lpips": ("lpips", "weights/v0.1/vgg.pth"),
    "dists": ("DISTS_pytorch", "weights.pt"),
}


class VGG16Features(nn.Module):
    """VGG16's convolutional trunk (`features`, 31 modules) returning the five relu taps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                cin = int(v)
        self.features = nn.Sequential(*layers)

    def taps(self, x: Tensor, *, pooling: Literal["max", "l2"] = "max") -> list[Tensor]:
        """(B, 3, H, W) normalised input -> [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]."""
        out = []
        start = 0
        for end in _STAGE_ENDS:
            for idx in range(start, end + 1):
                layer = self.features[idx]
                if isinstance(layer, nn.MaxPool2d) and pooling == "l2":
                    x = l2_pool(x)
                else:
                    x = layer(x)
            out.append(x)
            start = end + 1
        return out


def l2_pool(x: Tensor) -> Tensor:
    """DISTS's L2 pooling: sqrt of the Hann-weighted (3×3, sums to 1) mean of x², stride 2, pad 1."""
    hann = torch.tensor([0.5, 1.0, 0.5], dtype=x.dtype, device=x.device)
    window = torch.outer(hann, hann)
    window = (window / window.sum()).expand(x.shape[1], 1, 3, 3)
    return (F.conv2d(x * x, window, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


def load_vgg16_features(path_or_uri: str, *, sha256: str | None = None) -> VGG16Features:
    """Our VGG16 trunk with the `features.*` tensors of a torchvision VGG16 file (eval, frozen)."""
    state = load_state_dict(path_or_uri, sha256=sha256)
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    net = VGG16Features()
    expected = set(net.state_dict())
    if set(feats) != expected:
        missing = sorted(expected - set(feats))[:4]
        raise ValueError(
            f"{path_or_uri}: not torchvision VGG16 weights (missing {missing or 'none'}, "
            f"{len(set(feats) - expected)} unexpected)"
        )
    net.load_state_dict(feats)
    return net.eval().requires_grad_(False)


def _trunk(vgg16: str | VGG16Features, sha256: str | None) -> VGG16Features:
    return vgg16 if isinstance(vgg16, VGG16Features) else load_vgg16_features(vgg16, sha256=sha256)


def default_head_path(kind: HeadKind) -> str | None:
    """The head file inside an installed `lpips` / `dists-pytorch` package (not imported), or None."""
    package, rel = _HEAD_FILES[kind]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    return str(path) if path.is_file() else None


def _head_path(kind: HeadKind, path: str | None) -> str:
    found = path or default_head_path(kind)
    if found is None:
        package = "lpips==0.1.4" if kind == "lpips" else "dists-pytorch==0.1"
        raise FileNotFoundError(
            f"no {kind.upper()} head weights: pass their path, or install `{package}` with --no-deps "
            "(it ships the file)"
        )
    return found


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance; forward(x, y) with (B, 3, H, W) in [0, 1] -> (B,). Differentiable."""

    def __init__(self, vgg: VGG16Features, lins: list[Tensor]) -> None:
        super().__init__()
        if [int(w.shape[1]) for w in lins] != list(STAGE_CHANNELS):
            raise ValueError("LPIPS linear layers must have 64, 128, 256, 512, 512 input channels")
        self.vgg = vgg
        for k, w in enumerate(lins):
            self.register_buffer(f"lin{k}", w.reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))

    @classmethod
    def from_files(
        cls, vgg16: str | VGG16Features, head: str | None = None, *, vgg16_sha256: str | None = None
    ) -> LPIPS:
        """`vgg16`: torchvision's VGG16 file, or a trunk already loaded (shared with DISTS)."""
        state = load_state_dict(_head_path("lpips", head))
        try:
            lins = [state[f"lin{k}.model.1.weight"] for k in range(5)]
        except KeyError as exc:
            raise ValueError(f"not LPIPS v0.1 VGG linear weights (missing {exc})") from exc
        return cls(_trunk(vgg16, vgg16_sha256), lins).eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx = self.vgg.taps((x * 2 - 1 - self.shift) / self.scale)
        fy = self.vgg.taps((y * 2 - 1 - self.shift) / self.scale)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k, (a, b) in enumerate(zip(fx, fy, strict=True)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((a - b).pow(2) * getattr(self, f"lin{k}")).sum(1).mean(dim=(1, 2))
        return total


class DISTS(nn.Module):
    """DISTS; forward(x, y) with (B, 3, H, W) in [0, 1] -> (B,). Differentiable (a DGSA loss term)."""

    def __init__(self, vgg: VGG16Features, alpha: Tensor, beta: Tensor) -> None:
        super().__init__()
        channels = (3, *STAGE_CHANNELS)
        if alpha.numel() != sum(channels) or beta.numel() != sum(channels):
            raise ValueError(f"DISTS alpha/beta must have {sum(channels)} entries")
        self.vgg = vgg
        total = alpha.sum() + beta.sum()
        self.register_buffer("alpha", (alpha.reshape(-1) / total).clone())
        self.register_buffer("beta", (beta.reshape(-1) / total).clone())
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.channels = channels

    @classmethod
    def from_files(
        cls, vgg16: str | VGG16Features, head: str | None = None, *, vgg16_sha256: str | None = None
    ) -> DISTS:
        """`vgg16`: torchvision's VGG16 file, or a trunk already loaded (shared with LPIPS)."""
        state = load_state_dict(_head_path("dists", head))
        if "alpha" not in state or "beta" not in state:
            raise ValueError("not DISTS weights (need 'alpha' and 'beta')")
        return cls(_trunk(vgg16, vgg16_sha256), state["alpha"], state["beta"]).eval()

    def _features(self, x: Tensor) -> list[Tensor]:
        return [x, *self.vgg.taps((x - self.mean) / self.std, pooling="l2")]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        alphas = torch.split(self.alpha, self.channels)
        betas = torch.split(self.beta, self.channels)
        score = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for a, b, wa, wb in zip(self._features(x), self._features(y), alphas, betas, strict=True):
            mx, my = a.mean(dim=(2, 3)), b.mean(dim=(2, 3))
            vx = (a - mx[..., None, None]).pow(2).mean(dim=(2, 3))
            vy = (b - my[..., None, None]).pow(2).mean(dim=(2, 3))
            cov = (a * b).mean(dim=(2, 3)) - mx * my
            structure = (2 * mx * my + _DISTS_C) / (mx.pow(2) + my.pow(2) + _DISTS_C)
            texture = (2 * cov + _DISTS_C) / (vx + vy + _DISTS_C)
            score = score + (structure * wa).sum(1) + (texture * wb).sum(1)
        return 1 - score


def _batch(images: list[np.ndarray]) -> Tensor:
    arr = np.stack(
        [np.asarray(im, dtype=np.float32) / (255.0 if im.dtype == np.uint8 else 1.0) for im in images]
    )
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def score_images(
    net: LPIPS | DISTS, images: list[np.ndarray], refs: list[np.ndarray], *, batch_size: int = 16
) -> np.ndarray:
    """Per-pair distances of (H, W, 3) images (uint8, or float in [0, 1]) against their references."""
    if len(images) != len(refs):
        raise ValueError("images and refs differ in length")
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(net(_batch(images[i : i + batch_size]), _batch(refs[i : i + batch_size])).numpy())
    return np.concatenate(out) if out else np.zeros(0)
