"""Networks behind the learned metrics, defined here so user-supplied weight files load without
torchvision and nothing is ever downloaded (spec section 7.2, 7.5).

* `ArcFaceResNet18`: the arcface-pytorch `resnet_face18(use_se=False)` graph whose `resnet18_110.pth`
  weights VQFR uses for its identity metric (IDS / "Deg."): grayscale 128x128 in, 512-D out.
* `FIDInceptionV3`: the InceptionV3 variant of pytorch-fid (TF 2015-12-05 graph: average pools that do not
  count padding, a max pool in the last block), loading `pt_inception-2015-12-05-6726825d.pth`;
  (N, 3, H, W) in [0, 1] -> (N, 2048) pool3 features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynface.checkpoints import load_state_dict

# ---------------------------------------------------------------------------------------------------
# ArcFace ResNet-18 (VQFR identity metric)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class _IRBlock(nn.Module):
    """Pre-activation "improved residual" block: BN-conv-BN-PReLU-conv-BN, one PReLU shared twice."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.prelu = nn.PReLU()
        self.conv2 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.prelu(self.bn1(self.conv1(self.bn0(x))))))
        skip = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + skip)


class ArcFaceResNet18(nn.Module):
    """(N, 1, 128, 128) grayscale in (x - 127.5) / 127.5 -> (N, 512) embedding (fc5 + BatchNorm1d)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv3x3(1, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        widths, cin = (64, 128, 256, 512), 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            self.add_module(
                f"layer{i + 1}", nn.Sequential(_IRBlock(cin, width, stride), _IRBlock(width, width))
            )
            cin = width
        self.bn4 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout()
        self.fc5 = nn.Linear(512 * 8 * 8, 512)
        self.bn5 = nn.BatchNorm1d(512)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1:] != (1, 128, 128):
            raise ValueError(f"ArcFaceResNet18 expects (N, 1, 128, 128), got {tuple(x.shape)}")
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn4(x)).flatten(1)
        return self.bn5(self.fc5(x))


def cv2_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 luma with OpenCV's fixed-point BT.601 weights (RGB2GRAY)."""
    r, g, b = (rgb[..., c].astype(np.int64) for c in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14).astype(np.uint8)


def resize_linear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) -> (height, width) like OpenCV's INTER_LINEAR: half-pixel centres, edge clamping, no
    antialiasing (so a 512 -> 128 reduction reads 2 of every 4 pixels), rounded when `img` is uint8."""

    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
        i0 = np.floor(s).astype(np.int64)
        return i0, np.minimum(i0 + 1, n_in - 1), s - i0

    y0, y1, fy = taps(height, img.shape[0])
    x0, x1, fx = taps(width, img.shape[1])
    a = img.astype(np.float64)
    rows = a[y0] * (1 - fy)[:, None] + a[y1] * fy[:, None]
    out = rows[:, x0] * (1 - fx) + rows[:, x1] * fx
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if img.dtype == np.uint8 else out


def arcface_input(images: Sequence[np.ndarray]) -> Tensor:
    """(H, W, 3) RGB faces (uint8, or float in [0, 1], rounded to 8 bits as files are) -> (N, 1, 128, 128)
    float32 as VQFR feeds ResNet-18: cv2 gray, INTER_LINEAR resize to 128, (x - 127.5) / 127.5."""
    batch = []
    for img in images:
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"ArcFace input must be (H, W, 3) RGB, got shape {img.shape}")
        if np.issubdtype(img.dtype, np.floating):
            if not np.all(np.isfinite(img)) or img.min() < 0.0 or img.max() > 1.0:
                raise ValueError("float ArcFace input must be finite and lie in [0, 1]")
            img = np.rint(img * 255.0).astype(np.uint8)
        elif img.dtype != np.uint8:
            raise ValueError(f"ArcFace input must be uint8 or float, got {img.dtype}")
        batch.append(resize_linear(cv2_gray(img), 128, 128))
    x = (np.stack(batch).astype(np.float32) - 127.5) / 127.5
    return torch.from_numpy(x[:, None])


@dataclass(frozen=True, eq=False)
class ArcFaceIdentity:
    """VQFR's identity angle with user-supplied ArcFace ResNet-18 weights (`resnet18_110.pth`).

    VQFR reports the angle in degrees ("Deg.") and drops pairs under 1 degree as identical; the
    DynFaceRestore table's "IDA" reads as the same angle in radians (spec section 7.3).
    """

    net: ArcFaceResNet18
    device: str = "cpu"

    @classmethod
    def from_file(
        cls, path_or_uri: str, *, device: str = "cpu", sha256: str | None = None
    ) -> ArcFaceIdentity:
        """Load a local path or fsspec URI; a DataParallel `module.` prefix is stripped."""
        net = ArcFaceResNet18()
        _load_strict(net, load_state_dict(path_or_uri, sha256=sha256), path_or_uri)
        return cls(net=net.eval().to(device), device=device)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N (H, W, 3) RGB faces (see `arcface_input`) -> (N, 512) float64 embeddings."""
        return self.net(arcface_input(images).to(self.device)).double().cpu().numpy()

    def angles(
        self, images: Sequence[np.ndarray], refs: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(radians, degrees), each (N,): arccos of the cosine between the embeddings of images[i] and
        refs[i]."""
        a, b = self.embed(images), self.embed(refs)
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        rad = np.arccos(np.clip(cos, -1.0, 1.0))
        return rad, np.degrees(rad)

    def angle(self, img: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
        """(radians, degrees) between the embeddings of `img` and `ref`."""
        rad, deg = self.angles([img], [ref])
        return float(rad[0]), float(deg[0])


def _load_strict(net: nn.Module, state: dict[str, Tensor], source: str, ignore: tuple[str, ...] = ()) -> None:
    """load_state_dict that tolerates absent BatchNorm counters (old files lack them) and keys
    starting with `ignore`, and otherwise raises a ValueError naming what does not match."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{source}: not a {type(net).__name__} state dict "
            f"(missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})"
        )


# ---------------------------------------------------------------------------------------------------
# FID InceptionV3 (pytorch-fid flavour); module names follow the weight file's keys.


class _Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as in the TF graph) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    # The TF graph averages only over pixels inside the image.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):  # 35x35 stage: 64 + 64 + 96 + pool_features channels
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):  # 35 -> 17 reduction: 384 + 96 + cin channels
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockC(nn.Module):  # 17x17 stage with factorised 7x7 convolutions: 4 x 192 channels
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = {"padding": (0, 3)}, {"padding": (3, 0)}
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), **row)
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), **col)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), **col)
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), **row)
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for k in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{k}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):  # 17 -> 8 reduction: 320 + 192 + cin channels
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockE(nn.Module):  # 8x8 stage: 320 + 768 + 768 + 192 = 2048 channels
    def __init__(self, cin: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        # The TF graph's last block max-pools here; the one before it averages.
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """(N, 3, H, W) RGB in [0, 1] -> (N, 2048) pool3 features, preprocessed as pytorch-fid does:
    bilinear resize to 299x299 (align_corners=False, no antialiasing), then 2x - 1."""

    def __init__(self, num_classes: int = 1008) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, "avg")
        self.Mixed_7c = _BlockE(2048, "max")
        # Unused for features; kept so the file loads whole and its class count identifies it.
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 expects (N, 3, H, W), got {tuple(x.shape)}")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def load_fid_inception(path_or_uri: str, *, sha256: str | None = None) -> FIDInceptionV3:
    """Load pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (local path or fsspec URI). Its 1008-way
    classifier tells it apart from torchvision's ImageNet InceptionV3 (1000 classes), whose features
    are not the FID ones; auxiliary-classifier keys, if present, are ignored."""
    state = load_state_dict(path_or_uri, sha256=sha256)
    fc = state.get("fc.weight")
    if fc is None or tuple(fc.shape) != (1008, 2048):
        shape = None if fc is None else tuple(fc.shape)
        raise ValueError(f"{path_or_uri}: fc.weight is {shape}, not (1008, 2048): not FID Inception weights")
    net = FIDInceptionV3()
    _load_strict(net, state, path_or_uri, ignore=("AuxLogits.",))
    return net.eval()
