"""Gateway: the public Open Inference Protocol endpoint. Authenticates, admits, validates, forwards."""
