"""AttriMeter: explainable person re-identification.

``import attrimeter`` stays light (no torch): heavy sub-packages import torch themselves, so that
``attrimeter.runtime`` works on a box that has only numpy and a runtime backend.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
