"""The matrix spec: parsing, overrides, validation, expansion into cells."""
from .axes import AXES, AXIS_ORDER, DEFAULT_LEVELS
from .cells import Cell, expand, make_cell, reference_cell
from .errors import SpecError
from .spec import DatasetSpec, ModelSpec, Spec, load_spec, parse_spec

__all__ = ["AXES", "AXIS_ORDER", "DEFAULT_LEVELS", "Cell", "DatasetSpec", "ModelSpec", "Spec",
           "SpecError", "expand", "load_spec", "make_cell", "parse_spec", "reference_cell"]
