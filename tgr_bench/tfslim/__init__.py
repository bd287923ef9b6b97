"""TF-slim Inception-v3/v4, Inception-ResNet-v2 and ResNet-v2 for the converted .npy weights.

The TGR paper's CNN and defended targets are TF-slim checkpoints converted to PyTorch with
MMdnn (repository `ylhz/tf_to_pytorch_model`). This package re-implements those networks as
compact, data-configured modules whose layer names follow the TF scopes of the files, and reads
the files without executing their pickles:

    weights = read_weights("tf2torch_inception_v3.npy")   # or a converted .safetensors
    net = build_network("inc_v3", weights)                 # eval mode, (B,3,299,299) in [-1,1]
    logits = net(x)                                        # (B, 1001); index 0 = background

`convert` rewrites a .npy as safetensors once, so later runs load no pickle at all.
"""

from tgr_bench.tfslim.inception import (
    InceptionNet,
    InceptionResNetV2,
    InceptionSpec,
    InceptionV3,
    InceptionV4,
)
from tgr_bench.tfslim.layers import LayerSpec, TFSamePad, same_padding
from tgr_bench.tfslim.registry import (
    ARCHITECTURES,
    FILES,
    TFSlimFile,
    build_network,
    consumed_report,
    convert,
    create_network,
    expected_layers,
    key_for_weights,
    layer_names,
    load_network,
    skipped_layers,
)
from tgr_bench.tfslim.resnet_v2 import RESNET_V2_UNITS, BottleneckV2, ResNetV2
from tgr_bench.tfslim.weights import (
    FORMAT,
    is_tf2torch_file,
    read_weights,
    write_safetensors,
)

__all__ = [
    "ARCHITECTURES",
    "FILES",
    "FORMAT",
    "RESNET_V2_UNITS",
    "BottleneckV2",
    "InceptionNet",
    "InceptionResNetV2",
    "InceptionSpec",
    "InceptionV3",
    "InceptionV4",
    "LayerSpec",
    "ResNetV2",
    "TFSamePad",
    "TFSlimFile",
    "build_network",
    "consumed_report",
    "convert",
    "create_network",
    "expected_layers",
    "is_tf2torch_file",
    "key_for_weights",
    "layer_names",
    "load_network",
    "read_weights",
    "same_padding",
    "skipped_layers",
    "write_safetensors",
]
