"""The data contract: Parquet schemas, atomic writing, the manifest and environment fingerprint."""
from .schema import IMAGE_COLUMNS, IMAGE_SCHEMA, ROW_COLUMNS, cell_schema, row_schema
from .store import IncompleteRunError, RunDir, RunDirError, write_parquet_atomic

__all__ = ["IncompleteRunError", "IMAGE_COLUMNS", "IMAGE_SCHEMA", "ROW_COLUMNS", "RunDir", "RunDirError", "cell_schema",
           "row_schema", "write_parquet_atomic"]
