"""Quantization without a generator: the quantizer and its file format, packed codes, the data-free
baselines and QwT.

Modules, each importing only those above it here (and packages listed before this one in qg):
  packing     N-bit codes packed into bytes (the file format's codes)
  qwt         QwT: closed-form linear compensation per block on top of any quantization
  quantizer   QuantSpec, quantize, dequantize, fake_quantize (QAT)
  fileformat  the quantized safetensors format: packed codes, S, Z, checked on reading
  baselines   data-free quantizers beside PTQ (asymmetric RTN, MSE clipping, HQQ)
"""
