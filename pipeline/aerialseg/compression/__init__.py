"""Compression: ONNX export (with QGIS Deepness metadata), Taylor filter pruning, ONNX Runtime static int8."""
