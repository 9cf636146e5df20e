"""Builders of datasets, called by the stages: seed formats, self-instruct expansion and its filters,
preference import and generation, JSON I/O. No stage lives here (stages/ holds them)."""
