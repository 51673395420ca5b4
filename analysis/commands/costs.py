"""The cost model against runs: predicted vs measured memory per method (``analysis.costs``)."""

from analysis.commands import Command
from analysis.costs import costs

COMMANDS = [Command("costs", "Cost model: predicted vs measured memory per method, stacked bars", costs)]
