"""blt-pipeline: configuration, the stage contract and the `blt` command line."""

__version__ = "0.1.0"
