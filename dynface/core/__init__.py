"""The sampling core of DynFaceRestore, one file per paper component: diffusion process, blur operator,
guidance, sampler, DBLM, DSST, and the per-face plan that the estimate stage hands the sampler."""
