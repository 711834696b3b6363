"""Lower-precision variants of exported models (FP16, INT8, TensorRT) and their measured error."""
