"""Serving: run the bundled Triton server on a model repository, on any Linux machine.

Public API: TritonServer (context manager), start_on_free_ports, ServerError, free_ports,
port_in_use, process_tree, find_installation, prepare_backend_directory. `python -m serve` runs a server in the foreground.
Nothing here is imported by the models: the same repository loads in the NGC `tritonserver` image.
"""

from serve.launcher import (
    ServerError,
    TritonServer,
    find_installation,
    free_ports,
    port_in_use,
    prepare_backend_directory,
    process_tree,
    start_on_free_ports,
)

__all__ = [
    "ServerError",
    "TritonServer",
    "find_installation",
    "free_ports",
    "port_in_use",
    "prepare_backend_directory",
    "process_tree",
    "start_on_free_ports",
]
