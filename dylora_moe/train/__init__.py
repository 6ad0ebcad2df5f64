"""The training application: ``python train.py`` / ``dylora-moe-train`` (:mod:`.cli`), the Trainer, runs, data, base
models, sweeps, the console and the reports. The library (``dylora_moe`` outside this folder and ``evaluate/``, the
other application, which reads the corpora and base models through it) never imports it."""
