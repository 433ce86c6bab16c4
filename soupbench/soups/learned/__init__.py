"""Learned soups as one engine: learned soup(+), HL-Soup(+) and MEHL-Soup(+) are settings of `build`.

    θ_l = c_l + Σ_i w_{i,l} d_{i,l}

- parameterisation `simplex` (learned soup): c = 0, d_i = θ_i, w = softmax(β / T) over the models.
  `affine` (HL-Soup): d_i = θ_i − c, unit-normalised per coefficient group, w = α unconstrained, so the soup
  may extrapolate beyond the ingredients.
- granularity `model`: one coefficient per model; `layer` (the "+" variants): one per (model, group of
  consecutive tensors), a group closing once it holds more than `layer_size` parameters (0: one per tensor).
  Directions are normalised over the same groups, so a model-wise soup stays on the hyperplane spanned by
  the task vectors (one α moves every tensor of τ_i by the same factor).
- block_size b: b = K (null) learns all models at once; b < K is MEHL-Soup's block coordinate descent: the
  models are shuffled (`shuffle_models`), cut into blocks of b, each block's coefficients learned around the
  current soup, folded in, and freed; `num_passes` passes over the models ("model epochs").

Why it fits in memory: ∂L/∂w_{i,l} = <∇_{θ_l} L(θ), d_{i,l}>. One forward/backward of the single soup gives
∇θL; the coefficients' gradients are one GEMV per tensor against the block's stacked directions, pushed
through the (tiny) softmax/identity graph of the coefficients. No graph through K models is ever built, and
only the current block's directions are in memory. After every block the soup, the coefficients and the
settings are saved, so a killed run resumes from its last finished block.

Official-code details each kept as a setting: MEHL-Soup clips the model gradient ∇θL to norm 1 before
projecting it (`clip: model`); model-soups' learned soup+ learns a logit scale jointly with the mixing
weights (`logit_scale: learned`) at a constant lr (`schedule: constant`) without clipping.

Across GPUs (`distributed: auto` with an initialised torch.distributed group of W > 1 processes), for blocks
of directions that do not fit one device, as MEHL_soup_layer.py does: each rank loads only its contiguous
share of the block's models (`World.share`, the official `parts`); the soup θ = c + Σ_i w_i d_i is the
all-reduced sum of every rank's partial Σ over its own directions, and each rank projects ∇θL onto its own
directions. W ranks give one process's coefficients and soup bit for bit (tested with gloo on the CPU, at one
thread per process), which takes three departures from the official code. Any float noise matters: Adam
divides each coefficient's step by its gradient's running RMS, so a near-zero gradient's sign noise moves a
coefficient by up to lr; on the tiny preset's learned_plus the split batch alone, or float32 ∂L/∂w alone, made
two ranks' coefficients differ from one process's by up to 6.7e-5.
(1) Every rank runs the soup on the whole held-out batch, where the official code splits it with DDP over a
DistributedSampler: the shards' summed gradients differ from the whole batch's in float order. So by default
the forward/backward is not split over the ranks (the validation batches are, whole batches per rank);
`batch_pieces: P` cuts every batch into P pieces spread over the ranks, their gradients added in float64
(P >= W splits the forward/backward as DDP does): the coefficients then depend on P, never on W.
(2) Every float sum whose terms the ranks split is taken in float64 and rounded once, in one process too:
∂L/∂w (a row of a float32 GEMV depends on the rows beside it), the soup (float32 alone: 6.6e-7), the block's
mean and the directions' norms. A product of two float32 numbers is exact in float64, so the rounded value
does not depend on the split barring a tie at float64 precision.
(3) Every rank keeps all of the block's coefficients and their optimiser, assembling the rows of ∂L/∂w from
the ranks (`World.rows`, a few numbers per model) where the official code keeps only its own rows: the
softmax of learned soup(+) spans all models, and clipping ∂L/∂α needs them all.
Only rank 0 writes the progress files; it reads them on resume and sends the state to the others.

Buffers (BatchNorm running statistics) are not learned: they come from the centre (affine) or the uniform
mean of the block (simplex); re-estimate them on training data with `bn_recalibration` where they matter.

The package, each file read alone: settings.py (the settings and each variant's defaults), gradient.py (the
soup and the coefficients' gradient), blocks.py (blocks, directions, effective weights), resume.py (progress
after every block), loop.py (the loop: `build`).
"""

from soupbench.soups.learned.blocks import block_order, block_tensors, coefficient_groups, learnable_names
from soupbench.soups.learned.gradient import (
    coefficient_gradient,
    coefficient_weights,
    combine,
    inner_step,
    validation_loss,
)
from soupbench.soups.learned.loop import build
from soupbench.soups.learned.settings import DECLARATIONS, LearnedSettings

__all__ = ["DECLARATIONS", "LearnedSettings", "block_order", "block_tensors", "build", "coefficient_gradient",
           "coefficient_groups", "coefficient_weights", "combine", "inner_step", "learnable_names",
           "validation_loss"]
