"""xross: train K CNNs together with cross mutual learning (data pipeline, trainer, CLI)."""
