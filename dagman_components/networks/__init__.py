"""Networks: the Swin-DAGMaN encoder, its heads and the pretraining wrapper."""

from dagman_components.networks.outputs import EncoderOutput
from dagman_components.networks.attention_map import attention_to_voxels
from dagman_components.networks.heads import ProjectionHead, ReconstructionHead, TokenBatchNorm
from dagman_components.networks.pretrain import DAGMaNPretrainNetwork, check_head_batch_norm, make_teacher, unwrap
from dagman_components.networks.fused_attention import FusedWindowAttention, cls_attention, fuse_window_attention
from dagman_components.networks.swin_dagman import ENCODER_DEFAULTS, SemanticAttention, SwinDAGMaN
from dagman_components.networks.baselines import MaskedReconstructionNetwork
from dagman_components.networks.embedding import EmbeddingToken, EncoderEmbedding
