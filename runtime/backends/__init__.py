"""Engines: one model file run by ONNX Runtime, OpenVINO or TensorRT, and which backend runs what."""
