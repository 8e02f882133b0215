"""DynFaceRestore as a library: diffusion math, networks, guided sampler and the Restorer."""

__version__ = "0.1.0"
