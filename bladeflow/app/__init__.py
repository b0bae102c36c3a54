"""Application layer: the CLI, the local stack launcher and the demo (imports any layer, lazily)."""
