"""Serving: run the bundled Triton server on a model repository, on any Linux machine.

Public API: TritonServer (context manager), start_on_free_ports, ServerError, free_ports,
port_in_use, process_tree, find_installation (the nvidia-pytriton wheel's server), installation_at (a
Triton installation root, such as NGC's /opt/tritonserver), prepare_backend_directory. `python -m serve`
runs a server in the foreground, in a checkout as in the project's NGC-based image.
Nothing here is imported by the models: the same repository loads in the NGC `tritonserver` image.
"""

from serve.launcher import (
    ServerError,
    TritonServer,
    find_installation,
    free_ports,
    installation_at,
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
    "installation_at",
    "port_in_use",
    "prepare_backend_directory",
    "process_tree",
    "start_on_free_ports",
]
