"""Simulation: the PROVABGS prior, the photometric noise model (and its fit to real catalogs),
the conditioning-vector layout, and chunked, resumable, bit-reproducible training sets."""
