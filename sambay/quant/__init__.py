"""Weight formats: how a float weight becomes a quantized one and back, as plain tensor math.

int8: symmetric, one float32 scale per output row (`quantize_int8`); int4: group-wise 4-bit with
float16 scales (and mins), stored in the 4-bit kernel's layout (`sambay.quant.int4`). The kernels' layouts of
these formats (tiles, interleaving) live beside the kernels (sambay.kernels); checkpoints record the
format under `quantization_config` (QUANT_METHOD).
"""

from sambay.quant.int8 import QUANT_METHOD, dequantize_int8, quantize_int8

__all__ = ["QUANT_METHOD", "dequantize_int8", "quantize_int8"]
