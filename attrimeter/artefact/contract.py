"""The export's fixed names and small rules, in one torch-free place (docs/architecture.md §5).

Everything that reads or writes an export folder (the exporter, the AOT compiler, the TensorRT build, the C launcher's
table, the runtime) takes its names from here.
"""

from __future__ import annotations

__all__ = [
    "DTYPES",
    "ENGINE_FILE",
    "FLAVORS",
    "INPUT_NAME",
    "KERNELS_DIR",
    "KERNEL_INDEX",
    "LAUNCH_TABLE",
    "MODEL_FILE",
    "OUTPUT_NAMES",
    "PLUGIN_ID",
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "PLUGIN_SHARED_LIMIT",
    "POOL_KERNEL",
    "TIMING_CACHE_FILE",
    "TRITON_DTYPES",
]

# The graph flavours: standard ops only, or the masked pooling as one TensorRT plugin node.
FLAVORS = ("portable", "plugin")
# Float dtypes of an export's graph (its input and outputs are float32 either way).
DTYPES = ("float32", "float16")
INPUT_NAME = "images"
OUTPUT_NAMES = ("embedding", "attr_embeddings", "aam", "attr_logits")
MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
KERNELS_DIR = "kernels"
# Inside KERNELS_DIR: the index of every compiled kernel per GPU target, and the C launcher's table.
KERNEL_INDEX = "index.json"
LAUNCH_TABLE = "launch.txt"
# The plugin node: ONNX domain = TensorRT plugin namespace, op_type = plugin name.
PLUGIN_NAMESPACE = "attrimeter"
PLUGIN_NAME = "MaskedGemPool"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
# The AOT kernel behind the plugin (EXPORT/kernels/sm_XX/<POOL_KERNEL>.json).
POOL_KERNEL = "masked_gem_pool"
# Shared memory a TensorRT AOT plugin kernel may use: above 48 KiB a CUDA function needs an opt-in attribute, and
# TensorRT documents no way to set it for AOT plugins.
PLUGIN_SHARED_LIMIT = 48 * 1024
# Export float dtypes -> Triton pointer element types.
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16"}

