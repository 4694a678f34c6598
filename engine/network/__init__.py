"""The pretrained network and where it runs: backbones and their weights, the classifier model, batched forward
passes, device choice, torchrun, ONNX Runtime and its int8 graphs."""
