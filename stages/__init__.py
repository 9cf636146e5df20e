"""Training stages: one file each, readable top to bottom."""
