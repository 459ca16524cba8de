"""Replay public LLM traces against a running Patinox server, one tenant per trace source.

Load a trace (:func:`load_trace`, :func:`load_azure`, :func:`load_servegen`), create the
tenants (:func:`onboard`), send the requests at their trace times, open-loop and bounded
(:func:`replay`, :class:`ReplayBounds`) and show the per-tenant outcome
(:func:`render_table`, :meth:`ReplayReport.to_json`).
"""

from patinox.replay.runner import (
    ACCOUNTING,
    PERCENTILE_METHOD,
    ProgressCallback,
    ReplayBounds,
    ReplayProgress,
    ReplayReport,
    TenantHandle,
    TenantReport,
    onboard,
    percentile,
    prompt_of,
    render_table,
    replay,
)
from patinox.replay.traces import (
    AZURE_FILES,
    SERVEGEN_WINDOW_S,
    TRACES_DIR_ENV,
    BundledTrace,
    TraceRequest,
    default_traces_dir,
    list_traces,
    load_azure,
    load_servegen,
    load_trace,
    servegen_clients,
)

__all__ = [
    "ACCOUNTING",
    "AZURE_FILES",
    "PERCENTILE_METHOD",
    "SERVEGEN_WINDOW_S",
    "TRACES_DIR_ENV",
    "BundledTrace",
    "ProgressCallback",
    "ReplayBounds",
    "ReplayProgress",
    "ReplayReport",
    "TenantHandle",
    "TenantReport",
    "TraceRequest",
    "default_traces_dir",
    "list_traces",
    "load_azure",
    "load_servegen",
    "load_trace",
    "onboard",
    "percentile",
    "prompt_of",
    "render_table",
    "replay",
    "servegen_clients",
]
