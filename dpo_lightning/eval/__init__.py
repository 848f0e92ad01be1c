"""Evaluation by generation: batched answers, probes (name, degeneracy, drift), the before/after comparison."""
