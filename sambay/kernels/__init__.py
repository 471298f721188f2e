"""The native CPU kernels (csrc/, built on first use for this CPU) and what applies them to a model.

    prepare_for_inference(model, quantize="int8")  # linear layers packed, native decode chosen

A model itself never imports this package: `prepare_for_inference` swaps its linear layers for
`PackedLinear` and gives it the native backend from outside.
"""

from sambay.kernels.backend import LEVELS, NativeOps
from sambay.kernels.linear import PackedLinear, fast_cpu_matmul
from sambay.kernels.prepare import pack_model, prepare_for_inference, quantization_of, quantize_model
from sambay.kernels.native import (fast_paths, gemv, gemv_lowp_ref, gemv_ref, int8_rows_fast, native_status,
                                   parallel_threads, stream_read, tile_int8, tiles_int8, untile_int8)

__all__ = ["LEVELS", "NativeOps", "PackedLinear", "pack_model", "quantization_of", "fast_cpu_matmul", "fast_paths", "gemv", "gemv_lowp_ref", "gemv_ref", "int8_rows_fast",
           "native_status", "parallel_threads", "prepare_for_inference", "quantize_model", "stream_read",
           "tile_int8", "tiles_int8", "untile_int8"]
