"""fastadam: the Adam optimizer as one fused, in-place, compiled kernel over NumPy buffers."""
__version__ = "0.1.0"

from . import _backends  # noqa: E402
from ._flat import FlatParameters  # noqa: E402
from ._optimizer import Adam, AdamW  # noqa: E402

from ._config import show_config  # noqa: E402

try:  # load the compiled kernel now, so its OpenMP runtime starts with fastadam's settings
    _backends._load_cython()
except ImportError:
    pass

__all__ = ["Adam", "AdamW", "FlatParameters", "show_config", "__version__"]
