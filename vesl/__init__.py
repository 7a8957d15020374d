"""vesl: region-text data at web scale (VESL labeling) and CLOC pretraining."""

__version__ = "0.1.0"
