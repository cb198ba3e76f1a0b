"""Checkpoint conversion, in one place: our params <-> PyTorch names and layouts.

  layout.py         THE torch-layout table (names, transposes) + the one mismatch report
  hf.py             HF encoder folders / state dicts <-> our encoder params; tokenizers
  hf_export.py      our params -> an hf export folder (HF encoders, heads, gseps_torch.py)
  official_seps.py  the SEPS authors' checkpoint (`model_best.pth`) <-> our SEPS params
  common.py         ExportError, the model check, the expected param tree

`gseps_jax/export.py` is the command line (and Python API) over these.
"""
