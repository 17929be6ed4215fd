"""Low-rank joint factorisation of the NoPE keys and the values into one latent: [K_nope ; V] ~ W_UKV W_DKV.

M = [alpha K_nope ; V]  (2 H_kv D rows, hidden cols). For a rank r, with U_r an orthonormal basis of r output
directions, W_DKV = U_r^T M (the latent c = W_DKV x is the coordinates of the K/V vector in that basis) and
W_UKV = U_r, so K_nope ~ U_r,K W_DKV / alpha and V ~ U_r,V W_DKV.

    svd  U_r = top-r left singular vectors of M: best rank-r approximation of the weights (data-free).
    pca  U_r = top-r eigenvectors of M Sigma M^T, Sigma = E[x x^T] over calibration attention inputs: minimises
         E|(M - U_r U_r^T M) x|^2, i.e. PCA of the K/V activations. This is the same subspace as the whitened SVD
         of M Sigma^(1/2) (SVD-LLM style), computed without a Cholesky factor.

alpha (K/V balancing, TransMLA): sqrt(E|V x|^2 / E|K_nope x|^2), so neither part dominates the basis because of
its scale; it changes which directions are kept, never the function at full rank.

Metrics (``weighting.head_metrics``): with invertible S, T the factorised matrix is [alpha S K_nope ; T V] and
the decoders W_UK = S^-1 U_K / alpha, W_UV = T^-1 U_V (the basis is chosen in the metric, the weights are not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import check_choice


@dataclass
class JointKV:
    """The full ordered basis of one layer (truncate with :meth:`factors`).

    basis [2 H_kv D, R] orthonormal columns, energy [R] descending (squared singular values / PCA eigenvalues),
    alpha: the K scale; key_rows: how many leading rows of the basis belong to K_nope.
    """

    basis: torch.Tensor
    energy: torch.Tensor
    alpha: float
    key_rows: int
    joint: torch.Tensor  # M [2 H_kv D, hidden] (in the metric, when there is one)
    key_inverse: torch.Tensor | None = None  # S^-1 [H_kv D, H_kv D]
    value_inverse: torch.Tensor | None = None  # T^-1

    def retained(self, rank: int) -> float:
        """Fraction of the (weighted) energy kept at this rank."""
        total = self.energy.sum()
        return float(self.energy[:rank].sum() / total) if total > 0 else 1.0

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_DKV [r, hidden], W_UK [H_kv D, r], W_UV [H_kv D, r]."""
        basis = self.basis[:, :rank]
        down = basis.T @ self.joint
        up_k, up_v = basis[: self.key_rows] / self.alpha, basis[self.key_rows :]
        if self.key_inverse is not None:
            up_k, up_v = self.key_inverse @ up_k, self.value_inverse @ up_v
        return down, up_k, up_v


class LatentFactorization:
    """The orthonormal basis U_r of the joint K/V latent, from M [2 H_kv D, hidden] (module docstring)."""

    name: str = ""
    #: needs calibration activations (the second moment of the attention inputs)
    needs_calibration: bool = False

    def weight(self, moment: torch.Tensor | None) -> torch.Tensor | None:
        """The input metric the energies are measured in: E[x x^T] (pca) or None (the weights alone)."""
        return None

    def basis(self, joint: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(basis [2 H_kv D, R] orthonormal columns, energy [R] descending)."""
        raise NotImplementedError


class SVDFactorization(LatentFactorization):
    """Top-r left singular vectors of M: the best rank-r approximation of the weights (data-free)."""

    name = "svd"

    def basis(self, joint, weight):
        basis, singular, _ = torch.linalg.svd(joint, full_matrices=False)
        return basis, singular.square()


class PCAFactorization(LatentFactorization):
    """Top-r eigenvectors of M Sigma M^T: PCA of the K/V activations on calibration text."""

    name = "pca"
    needs_calibration = True

    def weight(self, moment):
        if moment is None:
            raise ValueError(
                "factorization='pca' needs calibration activations: pass calibration=... "
                "(CLI: --calibration-data FILE...), or use factorization='svd'"
            )
        return moment

    def basis(self, joint, weight):
        values, basis = torch.linalg.eigh(joint @ weight @ joint.T)
        rank = min(joint.shape)
        return basis.flip(1)[:, :rank], values.flip(0).clamp_min(0)[:rank]


#: the latent factorizations by name (``MLAConversionConfig.factorization``, ``--factorization``)
FACTORIZATIONS: dict[str, LatentFactorization] = {f.name: f for f in (SVDFactorization(), PCAFactorization())}


def factorization_named(name: str | LatentFactorization) -> LatentFactorization:
    """The registered factorization ``name`` (an object passes through); ``ValueError`` listing the names."""
    if isinstance(name, LatentFactorization):
        return name
    check_choice("factorization", name, FACTORIZATIONS)
    return FACTORIZATIONS[name]


def joint_kv(
    k_nope: torch.Tensor,
    v: torch.Tensor,
    factorization: str | LatentFactorization = "svd",
    moment: torch.Tensor | None = None,
    balance: bool = True,
    metrics=None,
) -> JointKV:
    """k_nope, v: [H_kv D, hidden] (float64). moment: E[x x^T] [hidden, hidden] (needed for ``pca``).
    metrics: ((S, S^-1), (T, T^-1)) [H_kv D, H_kv D] each, or None (module docstring)."""
    method = factorization_named(factorization)
    weight = method.weight(moment)
    inverses = (None, None)
    if metrics is not None:
        (s, s_inv), (t, t_inv) = metrics
        k_nope, v, inverses = s @ k_nope, t @ v, (s_inv, t_inv)

    def energy(w):
        return (w @ weight * w).sum() if weight is not None else w.square().sum()

    alpha = 1.0
    if balance:
        e_k, e_v = float(energy(k_nope)), float(energy(v))
        if e_k > 0 and e_v > 0:
            alpha = (e_v / e_k) ** 0.5
    joint = torch.cat([alpha * k_nope, v])
    basis, values = method.basis(joint, weight)
    # singular/eigen vectors are defined up to sign, which differs between LAPACK builds and devices: make the
    # largest entry of each column positive, so the same command gives the same weights on CPU and GPU
    top = basis.abs().argmax(0, keepdim=True)
    basis = basis * torch.where(basis.gather(0, top) < 0, -1.0, 1.0).to(basis.dtype)
    return JointKV(basis, values, alpha, k_nope.shape[0], joint, *inverses)
