"""Router: joins fresh features into model tensors, coalesces concurrent requests, balances replicas."""
