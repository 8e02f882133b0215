"""Loading a pack's networks: sha256 verified, built from their configs, loaded strictly, eval mode."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dynface.checkpoints import ChecksumError, load_state_dict, read_bytes, sha256_hex
from dynface.core.dsst import DSSTTable
from dynface.models.dgsa import DGSA, build_dgsa
from dynface.models.se import StdEstimator, build_sde
from dynface.models.swinir import SwinIR, build_swinir
from dynface.models.unet import DifFaceUNet, build_unet
from dynface.packs.manifest import PackManifest, check_exists, read_manifest


@dataclass(frozen=True, eq=False)
class LoadedPack:
    """The networks of a pack, in eval mode on CPU, plus its DSST table and manifest."""

    manifest: PackManifest
    prior: DifFaceUNet
    rm: SwinIR
    se: StdEstimator | None
    dgsa: DGSA | None
    dsst: DSSTTable | None

    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"prior": self.prior, "rm": self.rm}
        if self.se is not None:
            nets["se"] = self.se
        if self.dgsa is not None:
            nets["dgsa"] = self.dgsa
        return nets


def _load_network(manifest: PackManifest, name: str, module: nn.Module) -> nn.Module:
    uri = check_exists(manifest, name)
    state = load_state_dict(uri, sha256=manifest.components[name].sha256)
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)


def load_pack(pack: str | PackManifest, *, files_dir: str | None = None) -> LoadedPack:
    """Read a manifest (name, path or URI), verify sha256s and build every network strictly."""
    manifest = pack if isinstance(pack, PackManifest) else read_manifest(pack, files_dir=files_dir)
    comps = manifest.components
    prior = _load_network(manifest, "prior", build_unet(comps["prior"].config))
    rm = _load_network(manifest, "rm", build_swinir(comps["rm"].config))
    se = None
    if "sde" in comps:
        sde = _load_network(manifest, "sde", build_sde(comps["sde"].config))
        tm = _load_network(manifest, "tm", build_swinir(comps["tm"].config)) if "tm" in comps else None
        se = StdEstimator(sde, tm).eval()
    dgsa = _load_network(manifest, "dgsa", build_dgsa(comps["dgsa"].config)) if "dgsa" in comps else None
    dsst = None
    if "dsst" in comps:
        uri = check_exists(manifest, "dsst")
        data = read_bytes(uri)
        expected = comps["dsst"].sha256
        if expected is not None and sha256_hex(data) != expected:
            raise ChecksumError(f"{uri}: sha256 does not match the manifest")
        dsst = DSSTTable.from_json(data.decode())
    return LoadedPack(manifest=manifest, prior=prior, rm=rm, se=se, dgsa=dgsa, dsst=dsst)
