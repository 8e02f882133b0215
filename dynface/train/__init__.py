"""Training code for every DynFace component and the `starter` pack recipe (dynface.train.starter)."""
