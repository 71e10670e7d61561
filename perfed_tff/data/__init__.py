"""Federated datasets: each yields a `FederatedTask` (data + its default model)."""
