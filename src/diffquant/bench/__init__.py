"""The speed benchmark: one process per row, side by side in one table."""
