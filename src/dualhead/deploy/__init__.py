"""Deployment: ONNX export (and, later, distillation and the HTTP service)."""
