"""RLHF alignment pipeline: runner, configs, CLI and the shared machinery of the stages.

Folders map to import names (pyproject.toml, [tool.setuptools.package-dir]): pipeline/ is `rlhf`,
stages/ is `rlhf.stages`, data_builders/ is `rlhf.data_builders`, reward/ is `rlhf.reward`; so generic
names like `pipeline` or `stages` never land in a user's site-packages.
"""
