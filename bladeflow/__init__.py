"""bladeflow: make trained models fast to serve and safe to ship."""

__version__ = "0.1.0"
