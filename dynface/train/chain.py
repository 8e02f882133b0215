"""The stage chain of every recipe once a prior and an RM exist (spec §2.3 item 7, §3.9, §3.14):

    SDE pre-training → TM initialised from RM → SE = TM + SDE (std* labels from RM) → DSST table →
    DGSA through the frozen prior, RM and the trained SE.

Recipes differ in how a stage trains — the starter on its pair pools, `train complete` on fresh pairs,
possibly data-parallel — and pass those trainers in; the order and the wiring between stages live here
only (starter, complete and the training flows all call `run_chain`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from dynface.core.dsst import DSSTTable
from dynface.models.swinir import SwinIR, build_swinir
from dynface.train.common import LoopResult
from dynface.train.dgsa import FrozenNets
from dynface.train.se import SEResult

SETrainer = Callable[[nn.Module, nn.Module, nn.Module], SEResult]  # (rm, pre-trained sde, tm) -> SE
DGSATrainer = Callable[[FrozenNets], LoopResult]


@dataclass(frozen=True, eq=False)
class ChainStages:
    """How one recipe trains each stage; `dgsa` None stops the chain after the DSST table."""

    sde: Callable[[], LoopResult]
    se: SETrainer
    dsst: Callable[[], DSSTTable]
    dgsa: DGSATrainer | None = None


@dataclass(frozen=True, eq=False)
class Chain:
    """The trained stages. `nets`: what DGSA trains through (the trained SE, never a fixed std)."""

    sde: LoopResult
    se: SEResult
    dsst: DSSTTable
    nets: FrozenNets
    dgsa: LoopResult | None = None

    def then_dgsa(self, train: DGSATrainer) -> Chain:
        """DGSA for a recipe that does something between the DSST table and DGSA (the starter tunes ζ)."""
        return replace(self, dgsa=train(self.nets))

    def networks(self, configs: dict[str, dict[str, Any]]) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        """{component: (module, config)} of the trained networks, as `write_pack` takes them."""
        assert self.se.se.transfer is not None
        nets: dict[str, tuple[nn.Module, dict[str, Any]]] = {
            "tm": (self.se.se.transfer, configs["tm"]),
            "sde": (self.se.se.sde, configs["sde"]),
        }
        if self.dgsa is not None:
            nets["dgsa"] = (self.dgsa.model, configs["dgsa"])
        return nets


def transfer_model(rm: nn.Module, rm_config: dict[str, Any]) -> SwinIR:
    """A new SwinIR of RM's config holding RM's weights: TM's starting point (spec §3.9)."""
    tm = build_swinir(rm_config)
    tm.load_state_dict(rm.state_dict())
    return tm


def run_chain(
    *,
    prior: nn.Module,
    rm: nn.Module,
    rm_config: dict[str, Any],
    stages: ChainStages,
    std_range: tuple[float, float],
    resolution: int,
    rm_flip_ensemble: bool = False,
) -> Chain:
    """SDE → TM (from `rm`) → SE → DSST → DGSA (when `stages.dgsa`); `rm` and `prior` stay frozen.
    `rm_flip_ensemble`: DGSA runs RM as the pack's sampler will (dynface.core.dblm.restore_rm)."""
    sde = stages.sde()
    se = stages.se(rm, sde.model, transfer_model(rm, rm_config))
    dsst = stages.dsst()
    nets = FrozenNets(
        prior=prior,
        rm=rm,
        se=se.se,
        dsst=dsst,
        std_range=std_range,
        resolution=resolution,
        rm_flip_ensemble=rm_flip_ensemble,
    )
    chain = Chain(sde=sde, se=se, dsst=dsst, nets=nets)
    return chain.then_dgsa(stages.dgsa) if stages.dgsa is not None else chain
