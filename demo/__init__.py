"""The demo: `python -m demo` (what `make demo` runs) exports, serves and classifies a phantom."""
