"""Serving: run the bundled Triton server on a model repository, and the triage decision rule.

Public API: TritonServer (context manager), ServerError, free_ports, prepare_backend_directory,
set_threshold (operating point without re-export), and the pure decision functions used by
ct_postprocess. `python -m serve` runs a server in the foreground; `python -m serve.demo` is the demo.
"""
from serve.decision import Decision, DecisionError, decide, parse_threshold, triage_meta
from serve.launcher import ServerError, TritonServer, find_installation, free_ports, prepare_backend_directory
from serve.operating_point import set_threshold

__all__ = [
    "Decision",
    "DecisionError",
    "ServerError",
    "TritonServer",
    "decide",
    "find_installation",
    "free_ports",
    "parse_threshold",
    "prepare_backend_directory",
    "set_threshold",
    "triage_meta",
]
