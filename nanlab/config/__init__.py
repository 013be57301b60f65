"""Config: every named choice once (options), the schemas and range checks (schema),
and composing a config and explaining what is wrong with it in one line (compose).
"""
