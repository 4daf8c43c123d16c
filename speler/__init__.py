"""SpeLER: spectral-balanced energy propagation for annotating skeleton and sensor sequences."""

__version__ = "0.1.0"
