"""swarmlm: train language models across machines owned by people who do not trust each other."""

__version__ = "0.1.0"
