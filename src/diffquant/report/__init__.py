"""The HTML report and its tables."""
