"""The built-in scenarios' Keras and JAX builders, one module per scenario, named
after it (``nanlab.scenarios.frameworks.softmax_overflow``).

A scenario module is the torch lesson; it names its builders in ``FRAMEWORKS``
(``"module:function"`` per framework family), and framework workers import them from
here. Nothing in this package imports torch: a Keras-JAX or TensorFlow worker would
pay seconds for it and measure nothing with it. This folder is a package, not a
``.py`` file, so the registry never lists it as a scenario.
"""
