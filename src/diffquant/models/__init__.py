"""Pipelines and their denoisers: loading, per-model profiles, architectures, the denoiser families, shapes models."""
