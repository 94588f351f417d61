"""The DINOv2 (+SEM) self-distillation meta-architecture: student, EMA teacher, losses, one step.

One training step (``forward_backward``), for B images with 2 global crops and n local crops:

1. Teacher (no grad) on the 2B global crops, no masks. Its CLS outputs (for SEM backbones the SEM
   vector) are split per crop and **swapped**, ``t = cat(t_crop2, t_crop1)``, so that student
   crop 1 learns from teacher crop 2 and vice versa. With a shared head the swapped CLS tokens and
   the M masked patch tokens go through the one DINO head together; with ``ibot.separate_head``
   the patch tokens go through the iBOT head. Centering turns the logits into targets:
   ``centering`` = softmax((t - c) / T_t) with an EMA center, ``sinkhorn_knopp`` = 3 SK iterations.
2. Student on ``[global crops (with iBOT masks), local crops]`` in one ``forward_features`` call.
3. Losses, with ``n_loc_terms = max(2 n, 1)`` and ``n_glob_terms = (2 - 1) * 2 = 2`` and
   ``s = 1 / (n_loc_terms + n_glob_terms)`` (the reference's ``dino_loss_scale``)::

       dino_local  = s * sum_{local crop j} sum_{teacher crop c} CE(t_c, s_j)
       dino_global = 2 * s * mean_rows CE(swap(t), s_glob)
       koleo       = koleo_loss_weight * sum_{global crop c} KoLeo(student CLS of crop c)
       ibot        = 2 * (1/2) * iBOT(masked student patches, teacher targets)   (ibot_loss_scale = 1/2)
       total       = w_dino * (dino_local + dino_global) + koleo + w_ibot * ibot

   ``total.backward()`` runs inside the step. Reported parts follow the reference's display
   convention: ``koleo_loss`` and ``ibot_loss`` are halved (``total`` is the loss that was
   back-propagated, so it is not the sum of the reported parts).

The teacher is an EMA of the student: ``teacher = m * teacher + (1 - m) * student``
(``update_teacher``), starts as an exact copy, has no drop path, never requires grad and stays in
eval mode. On CUDA the forward passes run under bf16 autocast (``compute_precision.autocast``:
``auto``/``bf16`` on, ``off`` disabled); on CPU they run in float32.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from semlab.config.checks import check_initial_weights
from semlab.data.pipeline.normalize import to_device_normalized
from semlab.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from semlab.models import DINOHead, build_model_from_cfg
from semlab.train.checkpointing import load_initial_weights
from semlab.train.param_groups import get_param_groups

logger = logging.getLogger(__name__)

N_GLOBAL_CROPS = 2
LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total")


def _make_head(section: DictConfig, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=int(section.head_n_prototypes),
        nlayers=int(section.head_nlayers),
        hidden_dim=int(section.head_hidden_dim),
        bottleneck_dim=int(section.head_bottleneck_dim),
    )


class SSLMetaArch(nn.Module):
    """Student and EMA teacher (``nn.ModuleDict``s with ``backbone``, ``dino_head``[, ``ibot_head``])."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        self.embed_dim = embed_dim
        self.do_dino = float(cfg.dino.loss_weight) > 0
        self.do_koleo = float(cfg.dino.koleo_loss_weight) > 0
        self.do_ibot = float(cfg.ibot.loss_weight) > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        self.dino_loss_weight = float(cfg.dino.loss_weight)
        self.ibot_loss_weight = float(cfg.ibot.loss_weight)
        self.centering = str(cfg.train.centering)
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(
                f"unknown train.centering '{self.centering}': use 'centering' (softmax + EMA center) "
                "or 'sinkhorn_knopp'"
            )

        student: dict[str, nn.Module] = {
            "backbone": student_backbone,
            "dino_head": _make_head(cfg.dino, embed_dim),
        }
        teacher: dict[str, nn.Module] = {
            "backbone": teacher_backbone,
            "dino_head": _make_head(cfg.dino, embed_dim),
        }
        if self.do_ibot and self.ibot_separate_head:
            student["ibot_head"] = _make_head(cfg.ibot, embed_dim)
            teacher["ibot_head"] = _make_head(cfg.ibot, embed_dim)
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)

        chunk_rows = int(cfg.train.loss_chunk_rows)
        self.dino_loss = DINOLoss(int(cfg.dino.head_n_prototypes), chunk_rows=chunk_rows)
        ibot_dim = int(cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim, chunk_rows=chunk_rows)
        self.koleo_loss = KoLeoLoss()

        check_initial_weights(cfg)
        if cfg.MODEL.pretrained_backbone:
            logger.info("initialising student and teacher from %s", cfg.MODEL.pretrained_backbone)
            load_initial_weights(self, cfg.MODEL.pretrained_backbone)
        else:
            self.copy_student_to_teacher()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def copy_student_to_teacher(self) -> None:
        """teacher <- student, module by module (same architecture, teacher without drop path)."""
        for key in self.student:
            self.teacher[key].load_state_dict(self.student[key].state_dict())

    def train(self, mode: bool = True) -> SSLMetaArch:
        """Set the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def get_params_groups(self) -> list[dict[str, Any]]:
        return get_param_groups(self.student, self.cfg)

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA unless ``compute_precision.autocast`` is 'off'; nothing on CPU."""
        mode = str(self.cfg.compute_precision.autocast).lower()
        if mode not in ("auto", "bf16", "off"):
            raise ValueError(f"compute_precision.autocast must be auto, bf16 or off, got '{mode}'")
        if self.device.type == "cuda" and mode != "off":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """EMA: ``teacher = m * teacher + (1 - m) * student`` over matching parameters; BatchNorm running
        statistics are copied from the student."""
        student_params: list[Tensor] = []
        teacher_params: list[Tensor] = []
        for key in self.student:
            s_params = list(self.student[key].parameters())
            t_params = list(self.teacher[key].parameters())
            if len(s_params) != len(t_params):
                raise RuntimeError(f"student and teacher '{key}' have different parameter lists")
            student_params += s_params
            teacher_params += t_params
        torch._foreach_mul_(teacher_params, m)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - m)
        # Buffers (BatchNorm running statistics of a ``student.sem_norm=batch`` SEM) are not averaged:
        # the teacher, always in eval mode, normalises with the student's latest running statistics.
        for key in self.student:
            for (name, t_buf), s_buf in zip(self.teacher[key].named_buffers(), self.student[key].buffers()):
                if "running_" in name:
                    t_buf.copy_(s_buf)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def _teacher_targets(
        self, global_crops: Tensor, mask_indices: Tensor, n_masked_tensor: Tensor, teacher_temp: float
    ) -> tuple[Tensor, Tensor | None]:
        """Centered teacher targets: DINO (2, B, K) with the crops swapped, iBOT (M, K) or None."""
        with self.autocast():
            out = self.teacher.backbone(global_crops, is_training=True)
            cls = out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
            cls = torch.cat((cls[1], cls[0]))  # swap: student crop 1 learns from teacher crop 2
            n_cls = cls.shape[0]
            ibot_logits = None
            if self.do_ibot:
                patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
                if self.ibot_separate_head:
                    cls_logits = self.teacher.dino_head(cls)
                    ibot_logits = self.teacher.ibot_head(patches)
                else:
                    logits = self.teacher.dino_head(torch.cat((cls, patches)))
                    cls_logits, ibot_logits = logits[:n_cls], logits[n_cls:]
            else:
                cls_logits = self.teacher.dino_head(cls)
        cls_logits = cls_logits.float()
        ibot_logits = ibot_logits.float() if ibot_logits is not None else None

        if self.centering == "centering":
            dino_t = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            ibot_t = None
            if ibot_logits is not None:
                ibot_t = self.ibot_patch_loss.softmax_center_teacher(ibot_logits.unsqueeze(0), teacher_temp)
                ibot_t = ibot_t.squeeze(0)
                self.ibot_patch_loss.update_center(ibot_logits.unsqueeze(0))
        else:
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            ibot_t = None
            if ibot_logits is not None:
                ibot_t = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    ibot_logits, teacher_temp, n_masked_tensor
                )
        return dino_t.view(N_GLOBAL_CROPS, -1, dino_t.shape[-1]), ibot_t

    def _batch_to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch on the model's device; uint8 crops (``data.normalize_on_device``) normalised there."""
        return to_device_normalized(batch, self.device)

    def forward_backward(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, Tensor]:
        """One DINOv2 step on a collated batch (see the module doc); runs ``backward`` on the total.

        Returns detached scalar tensors: ``dino_local_crops_loss``, ``dino_global_crops_loss``,
        ``koleo_loss``, ``ibot_loss`` (those that are active) and ``total``.
        """
        missing = [
            k
            for k in (
                "collated_global_crops",
                "collated_local_crops",
                "collated_masks",
                "mask_indices_list",
                "n_masked_patches",
                "masks_weight",
            )
            if k not in batch
        ]
        if missing:
            raise KeyError(f"batch lacks {missing}; build it with semlab.data.collate_data_and_cast")
        batch = self._batch_to_device(batch)
        global_crops: Tensor = batch["collated_global_crops"]
        local_crops: Tensor = batch["collated_local_crops"]
        masks: Tensor = batch["collated_masks"]
        mask_indices: Tensor = batch["mask_indices_list"]
        n_masked = int(mask_indices.shape[0])
        masks_weight: Tensor = batch["masks_weight"]
        n_local = int(self.cfg.crops.local_crops_number)
        if global_crops.shape[0] % N_GLOBAL_CROPS:
            raise ValueError(
                f"collated_global_crops has {global_crops.shape[0]} rows, not 2 crops x B images"
            )
        has_local = n_local > 0 and local_crops.numel() > 0

        n_local_terms = max(n_local * N_GLOBAL_CROPS, 1)
        n_global_terms = (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS
        dino_loss_scale = 1.0 / (n_local_terms + n_global_terms)
        ibot_loss_scale = 1.0 / N_GLOBAL_CROPS
        loss_scales = 2  # the two global crops are processed together

        dino_t, ibot_t = self._teacher_targets(
            global_crops, mask_indices, batch["n_masked_patches"], teacher_temp
        )

        with self.autocast():
            if has_local:
                s_glob_out, s_loc_out = self.student.backbone(
                    [global_crops, local_crops], masks=[masks, None], is_training=True
                )
            else:
                s_glob_out = self.student.backbone(global_crops, masks=masks, is_training=True)
                s_loc_out = None
            s_glob_cls = s_glob_out["x_norm_clstoken"]
            head_inputs = [s_glob_cls]
            if s_loc_out is not None:
                head_inputs.insert(0, s_loc_out["x_norm_clstoken"])
            s_patches = None
            if self.do_ibot:
                s_patches = s_glob_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
                if not self.ibot_separate_head:
                    head_inputs.append(s_patches)
            sizes = [t.shape[0] for t in head_inputs]
            head_out = list(self.student.dino_head(torch.cat(head_inputs)).split(sizes))
            s_loc_logits = head_out.pop(0) if s_loc_out is not None else None
            s_glob_logits = head_out.pop(0)
            s_ibot_logits = None
            if self.do_ibot:
                s_ibot_logits = (
                    head_out.pop(0) if not self.ibot_separate_head else self.student.ibot_head(s_patches)
                )

        parts: dict[str, Tensor] = {}
        total = torch.zeros((), device=self.device)
        if s_loc_logits is not None:
            dino_local = self.dino_loss(s_loc_logits.chunk(n_local), list(dino_t)) * dino_loss_scale
            parts["dino_local_crops_loss"] = dino_local
            total = total + self.dino_loss_weight * dino_local
        if self.do_dino:
            dino_global = (
                self.dino_loss([s_glob_logits], [dino_t.flatten(0, 1)])
                * loss_scales
                * dino_loss_scale
            )
            parts["dino_global_crops_loss"] = dino_global
            total = total + self.dino_loss_weight * dino_global
            if self.do_koleo:
                koleo = float(self.cfg.dino.koleo_loss_weight) * sum(
                    self.koleo_loss(c) for c in s_glob_cls.chunk(N_GLOBAL_CROPS)
                )
                total = total + koleo
                parts["koleo_loss"] = koleo / loss_scales  # reference display convention
        if self.do_ibot and s_ibot_logits is not None and ibot_t is not None and n_masked > 0:
            ibot = (
                self.ibot_patch_loss.forward_masked(
                    s_ibot_logits,
                    ibot_t,
                    student_masks_flat=masks,
                    n_masked_patches=n_masked,
                    masks_weight=masks_weight,
                )
                * loss_scales
                * ibot_loss_scale
            )
            parts["ibot_loss"] = ibot / 2  # reference display convention
            total = total + self.ibot_loss_weight * ibot

        total.backward()
        parts["total"] = total
        return {k: v.detach() for k, v in parts.items()}
