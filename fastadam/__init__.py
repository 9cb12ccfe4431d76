"""fastadam: the Adam optimizer as one fused, in-place, compiled kernel over NumPy buffers."""
from . import _backends
from ._flat import FlatParameters
from ._optimizer import Adam, AdamW

try:  # load the compiled kernel now, so its OpenMP runtime starts with fastadam's settings
    _backends._load_cython()
except ImportError:
    pass

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "FlatParameters", "__version__"]
