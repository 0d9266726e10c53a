"""Hand-written CPU kernels (the ground floor: they import nothing of glmgym's)."""
