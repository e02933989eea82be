"""The `samed-adapter` command line: the parser (main.py), one module per command, argument types, the quick start and its demo data; it may import everything, and nothing imports it.

`samed-adapter` is :func:`samed_adapter.cli.main.main`; `python -m samed_adapter.cli` runs it too.
"""
