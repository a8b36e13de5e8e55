"""Export stage: ONNX, TensorRT engine and AOT kernels (docs/architecture.md §5)."""
