"""Ground floor: stage contract, settings, errors, registry vocabulary, ORT and MLflow factories.

Imports nothing else of bladeflow (docs/ARCHITECTURE.md, enforced by ``make lint``).
"""
