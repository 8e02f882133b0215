"""Compute tests/fixtures/fid_inception_reference.npz with pytorch-fid's own FID Inception.

Needs `pytorch-fid` (0.3.0) and a torchvision that imports beside the installed torch; nothing is
downloaded: the network gets the seeded random weights of tests/fid_reference.py instead of the
published file. Run once from the repository root: `python scripts/make_fid_inception_reference.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fid_reference import random_fid_state, reference_images  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "fid_inception_reference.npz"


def main() -> None:
    from pytorch_fid import inception as pf

    # pytorch-fid builds torchvision's InceptionV3, swaps in its FID blocks, then loads the published
    # weights through this function: hand it the seeded ones instead.
    pf.load_state_dict_from_url = lambda *args, **kwargs: random_fid_state(template)
    template = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    images = reference_images()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's input: [0, 1]
    with torch.no_grad():
        features = net(x)[0].squeeze(-1).squeeze(-1).double().numpy()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, features=features.astype(np.float32), images=images)
    print(f"wrote {OUT}: features {features.shape}, mean {features.mean():.6f}, std {features.std():.6f}")


if __name__ == "__main__":
    main()
