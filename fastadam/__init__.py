"""fastadam: the Adam optimizer as one fused, in-place, compiled kernel over NumPy buffers."""
from ._flat import FlatParameters
from ._optimizer import Adam, AdamW

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "FlatParameters", "__version__"]
