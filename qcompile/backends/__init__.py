"""Backends for integer-stage graphs: the reference executor (the spec), the fast executor, ONNX export."""
