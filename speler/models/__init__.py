"""The backbone: one building block per file, assembled in ``net.py``; losses in ``losses.py``."""

from speler.models.net import SpelerNet, SpelerOutput, build_model, paper_config

__all__ = ["SpelerNet", "SpelerOutput", "build_model", "paper_config"]
