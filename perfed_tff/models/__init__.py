"""Models for Per-FedAvg experiments (Keras builders and TFF model functions)."""
