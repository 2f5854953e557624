"""Foundations every layer uses: recipes, run configuration, results, errors, artifacts, progress, CPU decisions."""
