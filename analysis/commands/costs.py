"""The cost model against runs: predicted vs measured memory per method (``analysis.costs``)."""

from analysis.costs import costs

__all__ = ["costs"]
