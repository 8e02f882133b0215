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
from dynface.packs.manifest import PackManifest, resolve_pack


@dataclass(frozen=True, eq=False)
class LoadedPack:
    """The networks of a pack, in eval mode on CPU, plus its DSST table and (resolved) manifest."""

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


def _resolved(pack: str | PackManifest, weights_dir: str | None) -> PackManifest:
    if isinstance(pack, PackManifest) and pack.resolved:
        return pack
    return resolve_pack(pack, weights_dir=weights_dir)


def _load_network(manifest: PackManifest, name: str, module: nn.Module) -> nn.Module:
    state = load_state_dict(manifest.component_uri(name), sha256=manifest.components[name].sha256)
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)


def _load_se(manifest: PackManifest) -> StdEstimator | None:
    comps = manifest.components
    if "sde" not in comps:
        return None
    sde = _load_network(manifest, "sde", build_sde(comps["sde"].config))
    tm = _load_network(manifest, "tm", build_swinir(comps["tm"].config)) if "tm" in comps else None
    return StdEstimator(sde, tm).eval()


def load_dsst(manifest: PackManifest) -> DSSTTable | None:
    if "dsst" not in manifest.components:
        return None
    uri = manifest.component_uri("dsst")
    data = read_bytes(uri)
    expected = manifest.components["dsst"].sha256
    if expected is not None and sha256_hex(data) != expected:
        raise ChecksumError(f"{uri}: sha256 {sha256_hex(data)} does not match the manifest's {expected}")
    return DSSTTable.from_json(data.decode())


def load_pack(pack: str | PackManifest, *, weights_dir: str | None = None) -> LoadedPack:
    """Resolve a pack (name, manifest path/URI, or manifest) unless it is resolved already, verify every
    file's sha256 and build every network strictly."""
    manifest = _resolved(pack, weights_dir)
    comps = manifest.components
    prior = _load_network(manifest, "prior", build_unet(comps["prior"].config))
    rm = _load_network(manifest, "rm", build_swinir(comps["rm"].config))
    dgsa = _load_network(manifest, "dgsa", build_dgsa(comps["dgsa"].config)) if "dgsa" in comps else None
    return LoadedPack(
        manifest=manifest, prior=prior, rm=rm, se=_load_se(manifest), dgsa=dgsa, dsst=load_dsst(manifest)
    )


def load_planner_parts(
    pack: str | PackManifest, *, weights_dir: str | None = None
) -> tuple[StdEstimator | None, DSSTTable | None]:
    """Only what planning faces needs: the SE network (when the pack has one) and the DSST table."""
    manifest = _resolved(pack, weights_dir)
    return _load_se(manifest), load_dsst(manifest)
