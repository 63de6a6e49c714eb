"""The paper's measurements on any checkpoint, as functions a notebook can call and as the
``lightning-registers analyze`` command: norm distributions and per-layer shares, neighbour
similarity, linear probes, attention maps, LOST object discovery and test-time registers."""

from ..measures.norms import OutlierRule
from .analyze import (
    analyze,
    analyze_backbone,
    register_neuron_search,
    run_lost,
    test_time_register_effect,
)
from .attention import attention_maps, attention_on_high_norm
from .images import ImageSet, load_images, voc_boxes
from .loading import LoadedBackbone, infer_config, load_backbone
from .lost import (
    box_iou,
    centred_boxes,
    corloc,
    degree_order,
    last_block_features,
    lost,
    lost_box,
    pad_to_patches,
)
from .neighbours import neighbour_cosine, neighbour_similarity, patch_embeddings
from .norms import first_high_norm_layer, layer_statistics, norm_statistics
from .probes import pixel_probe, position_probe, token_classification
from .settings import PROTOCOLS, AnalysisSettings
from .test_time_registers import (
    FAMILIES,
    RegisterNeuron,
    add_test_time_register,
    find_register_neurons,
    model_family,
    outlier_tokens,
    sign_max,
)
from .tokens import output_tokens, patch_norms_by_layer

__all__ = [
    "FAMILIES",
    "PROTOCOLS",
    "AnalysisSettings",
    "ImageSet",
    "LoadedBackbone",
    "OutlierRule",
    "RegisterNeuron",
    "add_test_time_register",
    "analyze",
    "analyze_backbone",
    "attention_maps",
    "attention_on_high_norm",
    "box_iou",
    "centred_boxes",
    "corloc",
    "degree_order",
    "find_register_neurons",
    "first_high_norm_layer",
    "infer_config",
    "last_block_features",
    "layer_statistics",
    "load_backbone",
    "load_images",
    "lost",
    "lost_box",
    "model_family",
    "neighbour_cosine",
    "neighbour_similarity",
    "norm_statistics",
    "outlier_tokens",
    "output_tokens",
    "pad_to_patches",
    "patch_embeddings",
    "patch_norms_by_layer",
    "pixel_probe",
    "position_probe",
    "register_neuron_search",
    "run_lost",
    "sign_max",
    "test_time_register_effect",
    "token_classification",
    "voc_boxes",
]
