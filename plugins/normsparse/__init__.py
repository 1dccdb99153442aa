"""``normsparse``: norm x direction reparametrisation with an L1 penalty on the norms.

Paper (seed 001): *Research on Deep Neural Network Compression Based on Matrix Sparsity*
(基于矩阵稀疏化的深度神经网络压缩研究, master's thesis, 2019). Each FC neuron's incoming weight
vector is written ``w = r * u`` with ``||u||_2 = 1`` and each conv kernel slice ``K = r * U`` with
``||U||_F = 1``; training with ``lambda * sum(r)`` drives unimportant neurons and kernels to zero.
Here dead neurons and filters are removed physically (Torch-Pruning), dead kernel slices are
stored sparse, and the wrapper is folded back into plain weights. Reported: LeNet-300-100 -85.4%
parameters for +0.09% error, LeNet-5 FC layers -82.2% with no error increase, VGG-16 -90.5%.
"""

from __future__ import annotations

from netshrink import hookimpl
from netshrink.plugins.normsparse.compressor import NormSparse
from netshrink.plugins.normsparse.config import NormSparseConfig

__all__ = ["NormSparse", "NormSparseConfig", "register_compressors"]


@hookimpl
def register_compressors(register):
    """Register the ``normsparse`` compressor."""
    register(NormSparse)
