"""Model service: serves TorchScript models over the Open Inference Protocol, with dynamic batching."""
