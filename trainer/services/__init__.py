"""What runs around training: the Ray driver, MLflow runs and registry, the sweep check."""
