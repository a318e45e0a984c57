"""Figures of DAGMaN checkpoints (attention overlays)."""
