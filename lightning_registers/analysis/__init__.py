"""The paper's measurements on any checkpoint, as functions a notebook can call and as the
``lightning-registers analyze`` command: norm distributions and per-layer shares, neighbour
similarity, linear probes, attention maps, LOST object discovery and test-time registers."""

from ..measures.norms import OutlierRule
from .analyze import AnalysisSettings, analyze, analyze_backbone, test_time_register_effect
from .attention import attention_maps, attention_on_high_norm
from .images import ImageSet, load_images, voc_boxes
from .loading import LoadedBackbone, infer_config, load_backbone
from .lost import box_iou, centred_boxes, corloc, last_block_features, lost, lost_box
from .neighbours import neighbour_cosine, neighbour_similarity, patch_embeddings
from .norms import first_high_norm_layer, layer_statistics, norm_statistics
from .probes import pixel_probe, position_probe, token_classification
from .test_time_registers import RegisterNeuron, add_test_time_register, find_register_neurons
from .tokens import output_tokens, patch_norms_by_layer

__all__ = [
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
    "find_register_neurons",
    "first_high_norm_layer",
    "infer_config",
    "last_block_features",
    "layer_statistics",
    "load_backbone",
    "load_images",
    "lost",
    "lost_box",
    "neighbour_cosine",
    "neighbour_similarity",
    "norm_statistics",
    "output_tokens",
    "patch_embeddings",
    "patch_norms_by_layer",
    "pixel_probe",
    "position_probe",
    "test_time_register_effect",
    "token_classification",
    "voc_boxes",
]
