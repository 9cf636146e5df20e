"""Scoring responses: rubric judge, reward models."""
