"""The debugging tools users put into their own training.

``nanlab.trace`` (tracer, with attribution and the deferred GPU mode beside it),
``nanlab.guard`` and the per-step sentinel (sentinel), and the data checks
``validate_labels`` / ``validate_data`` (validate).
"""
