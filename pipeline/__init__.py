"""RLHF alignment pipeline: runner, configs and CLI."""
