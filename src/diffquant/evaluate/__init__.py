"""Measuring images: fidelity and adherence metrics, scoring at scale, sharded generation, sensitivity."""
