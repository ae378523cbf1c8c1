"""Amortized inference: the posterior bound to its flow (sampling, densities, band masks,
training support), its training, summaries, and catalog inference (plain and streaming)."""
