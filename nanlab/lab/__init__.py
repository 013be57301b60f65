"""The lab: what a scenario is and how one runs.

The scenario contract (scenario), the registry of built-in and plugin scenarios
(registry), the one training loop (loop) and what it builds from config (build,
data), the runner that drives a scenario's variants (runner), the verdict rules
(verdicts), mode=claims (claims) and the typed, torch-free results (result).
"""
