"""hired_batch: HiRED-pruned LLaVA batch inference on Ray Data.

Layers, imported one way only: jobs -> pipeline -> stages -> model -> hired.
"""

__version__ = "0.1.0"
