"""Models: the DINOv2 ViT with the SEM bottleneck, the DINO head, checkpoint adapters and builders.

Pure PyTorch: nothing here knows of FSDP, torch.compile, Ray or MLflow.
"""

from semlab.models.build import backbone_kwargs, build_backbone, build_model_from_cfg
from semlab.models.heads import DINOHead
from semlab.models.sem import SEM_VARIANTS, SimplicialEmbedding
from semlab.models.vit import (
    ARCHITECTURES,
    DinoVisionTransformer,
    interpolate_patch_pos_embed,
    vit_base,
    vit_base_sem,
    vit_giant2,
    vit_giant2_sem,
    vit_large,
    vit_large_sem,
    vit_small,
    vit_small_sem,
    vit_tiny,
    vit_tiny_sem,
)
from semlab.models.weight_layouts import (
    CheckpointError,
    LoadResult,
    convert_block_layout,
    extract_state_dict,
    load_weights,
    read_checkpoint,
    save_weights,
)

__all__ = [
    "ARCHITECTURES",
    "SEM_VARIANTS",
    "CheckpointError",
    "DINOHead",
    "DinoVisionTransformer",
    "LoadResult",
    "SimplicialEmbedding",
    "backbone_kwargs",
    "build_backbone",
    "build_model_from_cfg",
    "convert_block_layout",
    "extract_state_dict",
    "interpolate_patch_pos_embed",
    "load_weights",
    "read_checkpoint",
    "save_weights",
    "vit_base",
    "vit_base_sem",
    "vit_giant2",
    "vit_giant2_sem",
    "vit_large",
    "vit_large_sem",
    "vit_small",
    "vit_small_sem",
    "vit_tiny",
    "vit_tiny_sem",
]
