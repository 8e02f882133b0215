"""Networks: the DifFace UNet prior, SwinIR (RM and TM), the std estimator and DGSA."""

from dynface.models.dgsa import DGSA, DGSAConfig, build_dgsa
from dynface.models.se import SDEConfig, StdEstimator, StdEstimatorNet, build_sde
from dynface.models.swinir import SwinIR, SwinIRConfig, build_swinir
from dynface.models.unet import DifFaceUNet, UNetConfig, build_unet

__all__ = [
    "DGSA",
    "DGSAConfig",
    "DifFaceUNet",
    "SDEConfig",
    "StdEstimator",
    "StdEstimatorNet",
    "SwinIR",
    "SwinIRConfig",
    "UNetConfig",
    "build_dgsa",
    "build_sde",
    "build_swinir",
    "build_unet",
]
