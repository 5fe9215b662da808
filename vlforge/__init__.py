"""vlforge: vision-language pretraining experiments."""

__version__ = "0.1.0"
