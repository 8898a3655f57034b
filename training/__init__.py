"""Training stages (Lightning): ``train_entropy``, ``train_blt`` and the byte-level ``train_baseline``.

- ``artifacts``: ``save_model`` / ``load_model`` of ``<stage dir>/model.pt``.
- ``packing``: documents -> byte rows / patch rows (fixed patch budget), resumable state.
- ``datamodule``, ``modules``, ``callbacks``, ``wandb_utils``: the Lightning pieces.
- ``run``: the entry point run as a subprocess (``python -m training.run ...``); ``launch`` starts it and
  streams its output; ``entropy_stage`` / ``blt_stage``: the stage library functions (``run_train_*``).
"""
