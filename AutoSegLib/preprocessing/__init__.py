"""Preprocessing: crop, normalize, resample (pure array functions) and their inverses."""
