"""gradspec: layer-wise gradient spectra of language models under post-training data."""

__version__ = "0.1.0"
