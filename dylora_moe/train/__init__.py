"""The training application: ``python train.py`` / ``dylora-moe-train`` (:mod:`.args` the flags, :mod:`.cli` the
run), the Trainer, runs, packing, sweeps, the console and the reports. The library (``dylora_moe`` outside this
folder and ``evaluate/``, including the corpora and base models both applications read) never imports it, nor does
the evaluation application, which training calls."""
