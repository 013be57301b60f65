"""Exceptions nanlab raises on purpose. Kept free of torch so the CLI can import them cheaply."""


class ConfigError(ValueError):
    """A config value a user gave that nanlab cannot run with.

    The CLI prints it as one line and exits with status 2, so the message must name
    the key, the value, and what is allowed.
    """

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value}: {allowed}")


class NonFiniteError(RuntimeError):
    """Raised by ``nanlab.guard`` at the first training step that went non-finite.

    ``step`` counts calls of the guarded function from 0, ``quantity`` is what the
    sentinel saw first (loss, gradients or parameters), and ``event`` is the tracer's
    account of the first op that produced a NaN or Inf (None if replay found none).
    """

    def __init__(self, step: int, quantity: str, event=None):
        self.step, self.quantity, self.event = step, quantity, event
        where = f": {event.describe()}" if event is not None else ""
        super().__init__(f"non-finite {quantity} at step {step}{where}")
