"""Sweeps: many runs of one scenario, summarized the same way however they ran.

Hydra multirun summaries (summary), mode=sweep's grid in one process (grid), the
batched engine that trains many copies together (engine), mode=boundary (boundary),
and the stability and boundary maps (maps).
"""
