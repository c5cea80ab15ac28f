"""``dmx localize``: the first layer where a backend or precision diverges.

Both sides run the same ONNX graph (torch through dmx's ONNX interpreter, ONNX Runtime with
extra graph outputs, OpenVINO with ``add_outputs``); tensors are joined by ONNX name and reduced
to a few numbers where computed. See README "Where in the model: dmx localize".
"""
from .api import localize_models
from .engine import REL_L2_TOLERANCE, LocalizeResult, localize, tolerance_for
from .graph import LocalizeError
from .run import localize_run
from .text import format_text

__all__ = ["LocalizeError", "LocalizeResult", "REL_L2_TOLERANCE", "format_text", "localize",
           "localize_models", "localize_run", "tolerance_for"]
