"""The command line: parses arguments and calls the Python API."""
