"""Command-line helpers around a run folder (``python tools/<tool>.py --help``)."""
