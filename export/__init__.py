"""Export stage: ONNX, TensorRT engine and AOT kernels (DESIGN §5). Filled in by the export issue."""
