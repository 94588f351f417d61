"""Simplicial Embedding (SEM) bottleneck (Lavoie et al., "Simplicial Embeddings in Self-Supervised
Learning and Downstream Classification", ICLR 2023), as placed in DINOv2 by the SEM recipe.

Math, for the pre-norm CLS + R register tokens ``t`` of shape (B, 1+R, D), ``u = flatten(t)``
(B, (1+R)*D), L simplices of V vertices and temperature tau:

    z = LayerNorm_{L*V}(sem_embed(u)), eps 1e-6         sem_embed: Linear((1+R)*D -> L*V, no bias)
    s = flatten(softmax(view(z, B, L, V) / tau, dim=V))  the "raw" SEM output, (B, L*V)
    y = sem_out(s)                                      sem_out: Linear(L*V -> D, no bias)

The backbone then applies its final ``norm`` to ``y`` to give ``x_norm_clstoken``. The SEM linear
probe and the discrete latent codes read ``s``; DLC = argmax over each simplex (L ints in [0, V)).

Variants (``sem_variant``):

- ``"full"`` (default, the recipe's SEM): as above.
- ``"shared"`` (semlab's definition): ``sem_embed`` maps u to L views of width ``view_dim``
  (default V), and one bias-free ``sem_shared`` Linear(view_dim -> V), shared by all simplices,
  gives each simplex's logits: ``z = LayerNorm(flatten_l(sem_shared(view_l(sem_embed(u)))))``.
- ``"pos_shared"`` (semlab's definition): ``"shared"`` plus a learned per-simplex position
  embedding ``sem_pos`` (L, view_dim) added to each view before the shared projection.

Normalisation of the logits (``sem_norm_type``):

- ``"layer"`` (default, the reference): LayerNorm over the L*V logits of each image, as above.
- ``"batch"`` (the SEM paper's code, which puts BatchNorm1d after its embedder): each of the L*V
  logits is standardised over the batch, ``z_j = gamma_j (a_j - mu_j) / sqrt(var_j + 1e-5) + beta_j``
  with ``mu_j``, ``var_j`` the batch mean and variance of logit j (running averages, momentum 0.1, in
  eval mode). Every vertex then has zero mean over the images, so an image-independent component of
  the input cannot pick the same vertex for every image; a per-image LayerNorm leaves such a
  component in place.

The reference also defined ``sem_cls_norm``, which its forward never uses; semlab has no such
module and the checkpoint loader drops those keys.

:class:`SEMMixin` holds the parameters and math so that the backbone can carry them at top level
(keys ``sem_embed.weight``, ``sem_norm.weight``... as in the reference layout);
:class:`SimplicialEmbedding` is the same as a standalone module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from semlab.config.checks import check_sem

SEM_VARIANTS = ("full", "shared", "pos_shared")
SEM_NORMS = ("layer", "batch")


class SEMMixin:
    """SEM parameters and math for an ``nn.Module`` subclass; call :meth:`_init_sem` in ``__init__``."""

    sem_L: int
    sem_V: int
    sem_temp: float
    sem_variant: str
    sem_norm_type: str

    def _init_sem(
        self,
        in_dim: int,
        embed_dim: int,
        L: int,
        V: int,
        temp: float = 1.0,
        variant: str = "full",
        view_dim: int | None = None,
        norm: str = "layer",
    ) -> None:
        check_sem(L, V, building=True)
        if variant not in SEM_VARIANTS:
            raise ValueError(f"unknown sem_variant {variant!r}; expected one of {SEM_VARIANTS}")
        if norm not in SEM_NORMS:
            raise ValueError(f"unknown SEM norm {norm!r}; expected one of {SEM_NORMS}")
        self.sem_L, self.sem_V, self.sem_variant, self.sem_norm_type = int(L), int(V), variant, norm
        self.set_sem_temp(temp)
        lv = self.sem_L * self.sem_V
        if variant == "full":
            self.sem_embed = nn.Linear(in_dim, lv, bias=False)
        else:
            vd = int(view_dim or self.sem_V)
            self.sem_view_dim = vd
            self.sem_embed = nn.Linear(in_dim, self.sem_L * vd, bias=False)
            self.sem_shared = nn.Linear(vd, self.sem_V, bias=False)
            if variant == "pos_shared":
                self.sem_pos = nn.Parameter(torch.zeros(1, self.sem_L, vd))
                nn.init.trunc_normal_(self.sem_pos, std=0.02)
        self.sem_norm = nn.LayerNorm(lv, eps=1e-6) if norm == "layer" else nn.BatchNorm1d(lv)
        self.sem_out = nn.Linear(lv, embed_dim, bias=False)

    @property
    def has_sem(self) -> bool:
        return getattr(self, "sem_L", 0) > 0

    def set_sem_temp(self, temp: float) -> None:
        """Set the softmax temperature tau used when no ``temp`` is passed (1e-5 at evaluation)."""
        check_sem(temp=temp)
        self.sem_temp = float(temp)

    def sem_logits(self, tokens: Tensor) -> Tensor:
        """Normalised logits ``z`` (B, L*V) from tokens (B, 1+R, D) or flat (B, (1+R)*D)."""
        u = tokens.flatten(1)
        if self.sem_variant == "full":
            z = self.sem_embed(u)
        else:
            views = self.sem_embed(u).view(u.shape[0], self.sem_L, self.sem_view_dim)
            if self.sem_variant == "pos_shared":
                views = views + self.sem_pos.to(views.dtype)
            z = self.sem_shared(views).flatten(1)
        return self.sem_norm(z)

    def sem_simplex_from_logits(self, z: Tensor, temp: float | None = None) -> Tensor:
        """``flatten(softmax(view(z, B, L, V) / tau))``, computed in float32, returned in z's dtype."""
        tau = self.sem_temp if temp is None else float(temp)
        check_sem(temp=tau)
        s = (z.float() / tau).view(z.shape[0], self.sem_L, self.sem_V).softmax(dim=-1)
        return s.flatten(1).to(z.dtype)

    def sem_simplex(self, tokens: Tensor, temp: float | None = None) -> Tensor:
        """The raw SEM output ``s`` (B, L*V): L softmax simplices at temperature ``temp`` (default tau)."""
        return self.sem_simplex_from_logits(self.sem_logits(tokens), temp)

    def sem_codes(self, tokens: Tensor) -> Tensor:
        """Discrete latent codes (B, L) long: argmax of each simplex (independent of tau > 0)."""
        z = self.sem_logits(tokens)
        return z.view(z.shape[0], self.sem_L, self.sem_V).argmax(dim=-1)

    def sem_project(self, tokens: Tensor, temp: float | None = None) -> Tensor:
        """``sem_out(s)`` (B, D): the SEM vector before the backbone's final norm."""
        return self.sem_out(self.sem_simplex(tokens, temp))


class SimplicialEmbedding(SEMMixin, nn.Module):
    """Standalone SEM: tokens (B, 1+R, D) or (B, in_dim) -> ``sem_out(simplex)`` (B, embed_dim).

    ``in_dim`` is (1+R)*D for the backbone's use. See the module docstring for the math.
    """

    def __init__(
        self,
        in_dim: int,
        embed_dim: int,
        L: int,
        V: int,
        temp: float = 1.0,
        variant: str = "full",
        view_dim: int | None = None,
        norm: str = "layer",
    ):
        nn.Module.__init__(self)
        self.in_dim = in_dim
        self._init_sem(in_dim, embed_dim, L, V, temp, variant, view_dim, norm)

    def forward(self, tokens: Tensor, temp: float | None = None) -> Tensor:
        return self.sem_project(tokens, temp)

    def extra_repr(self) -> str:
        return (
            f"L={self.sem_L}, V={self.sem_V}, temp={self.sem_temp}, variant={self.sem_variant!r}, "
            f"norm={self.sem_norm_type!r}"
        )
