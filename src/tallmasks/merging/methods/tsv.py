"""TSV-M, Task Singular Vectors: Merge (Gargiulo et al., CVPR 2025).

Per layer matrix: each task's update is truncated to its top r/T singular triplets (r = min(m, n));
the concatenated left and right singular vectors are decorrelated by orthogonal Procrustes
(U -> P Q^T for U = P S Q^T), and the layer becomes U_orth diag(s) V_orth. Non-matrix keys (and
``text_projection``) are averaged over tasks. Alpha is chosen on validation from 0.1 ... 3.0.
"""

from __future__ import annotations

import torch

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.merging.layers import merge_layers, svd, task_tensors
from tallmasks.merging.registry import COEF_GRID, Vector, register


def tsv_layer(cs: CheckpointSet, key: str, device="cpu") -> torch.Tensor:
    """TSV-M of one layer matrix, its tasks read one at a time."""
    rows, cols = cs.shapes[key]
    rank = min(rows, cols)
    kept = int(rank * (1 / cs.num_tasks))  # per task, as the reference computes it
    sum_u = torch.zeros(rows, rank, device=device)
    sum_s = torch.zeros(rank, device=device)
    sum_v = torch.zeros(rank, cols, device=device)
    for t, tau in enumerate(task_tensors(cs, key, device)):
        u, s, vh = svd(tau)
        sum_u[:, t * kept : (t + 1) * kept] = u[:, :kept]
        sum_s[t * kept : (t + 1) * kept] = s[:kept]
        sum_v[t * kept : (t + 1) * kept, :] = vh[:kept, :]
    u_u, _, vh_u = svd(sum_u)
    u_v, _, vh_v = svd(sum_v)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_v, vh_v))


@register("tsv", COEF_GRID, "TSV-M: per-layer low-rank task singular vectors, decorrelated; alpha in 0.1..3.0", alpha_max=3.0)
def tsv_method(cs: CheckpointSet, *, device: str = "cpu") -> Vector:
    """TSV-M merged vector, layer by layer."""
    return merge_layers(cs, lambda key: tsv_layer(cs, key, device), "TSV-M layers", device)
