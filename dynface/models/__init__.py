"""Networks: the DifFace UNet prior, SwinIR (RM and TM), the std estimator and DGSA."""
