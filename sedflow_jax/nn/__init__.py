"""Normalizing flows on arrays (they know no galaxies): the conditional MAF, its training data
sources, portable checkpoints and the training loop."""
