"""Evaluation: calibration diagnostics (SBC, coverage, TARP, C2ST), plots, validation runs."""
