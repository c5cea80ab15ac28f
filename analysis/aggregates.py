"""Computing a run's summary (``dmx.analysis.summary``): what ``explain``, ``check``,
``report`` and ``diff`` read instead of scanning the rows, computed once when the run is compacted (at the
end of ``dmx run`` and by ``dmx compact``)."""
from __future__ import annotations

from dmx.results.store import RunDir

from .check import stored_tables
from .db import open_run
from .panels import panel_tables
from .summary import query_tables, rows_key, store_tables


def write_summary(location: str | RunDir) -> int:
    """Compute and store the summary of the run at ``location``; returns the rows it holds."""
    run = location if isinstance(location, RunDir) else RunDir(location)
    key = rows_key(run)       # before the rows are read: rows changed meanwhile void it
    con = open_run(run)
    tables = query_tables(con, run)
    tables.update(stored_tables(con, run.read_manifest(), tables["cell_precision"].to_pylist()))
    tables.update(panel_tables(con))
    return store_tables(run, tables, key)
