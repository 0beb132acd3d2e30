"""Issue 25's storages: FP8 (``fp8``), microscaled FP4 (``fp4``: NVFP4 and MXFP4), rotation before quantization
(``rotated``) and product quantization (``pq``), each a codec (``storage.codec.CodecStore``); KVTC transform coding
(``kvtc``: blocks of tokens entropy-coded together, so a ``TokenStore`` of its own)."""
