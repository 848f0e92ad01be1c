"""Pair building from a model's own answers (build-pairs) and the rewards that score them."""
