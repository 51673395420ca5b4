"""analysis: the LoRA and DoRA papers' analyses of learned low-rank updates, exact to their definitions.

Maths on plain arrays or tensors (float64, no files, no training code):

    analysis.subspace.similarity(A1, A2)            LoRA §7.2 φ(A1, A2, i, j)        Figures 3, 4, 6, 7, 8
    analysis.amplification.amplification(W, ΔW, r)  LoRA §7.3 ‖UᵀWVᵀ‖_F and factor   Table 7
    analysis.decomposition.magnitude_direction(W0, W) DoRA §3.2 (ΔM, ΔD)              DoRA Figure 2
    analysis.tables                                  LoRA Tables 5-7 from a sweep

Edges: `analysis.inputs` reads run directories through `lowrank.runner.results` only; `analysis.figures` draws
paper-style figures; ``python -m analysis <analysis> <run or sweep dirs>`` writes them beside the sweep.
"""

from analysis import amplification, decomposition, subspace
from analysis.amplification import amplification as amplification_row
from analysis.decomposition import magnitude_direction
from analysis.subspace import similarity

__all__ = ["subspace", "amplification", "decomposition", "similarity", "amplification_row", "magnitude_direction"]
