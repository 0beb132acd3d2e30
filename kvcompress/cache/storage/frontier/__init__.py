"""Issue 25's storages, each a codec (``storage.codec.CodecStore``): FP8 (``fp8``), microscaled FP4 (``fp4``:
NVFP4 and MXFP4), rotation before quantization (``rotated``) and product quantization (``pq``)."""
