"""A trained run's encoders outside torch: ONNX graphs (`graphs`) and onnxruntime sessions over them (`runtime`)."""
