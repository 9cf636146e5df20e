"""Stages and helpers that build datasets: instructions, preferences."""
