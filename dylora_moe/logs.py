"""The commands' log: every library record once, in the log's format.

huggingface_hub gives its loggers a handler of their own and lets them propagate too, so after
``logging.basicConfig`` each of its warnings (the hub's "Retrying in 1s [Retry 1/5]") prints twice, once bare and
once formatted. :func:`one_line_per_record` drops the library's own handler: its records reach the root handler
only. It also drops bitsandbytes' notice that its optional CPU 4-bit kernel cannot be fetched from the hub: peft
imports bitsandbytes wherever it is installed, so every run printed two warnings about a kernel it never uses (a
4-bit base on the CPU runs bitsandbytes' own code without it; docs/quantized.md).
"""

from __future__ import annotations

import logging

# The loggers of bitsandbytes' hub-kernel notice ("Failed to load CPU gemm_4bit_forward from kernels-community")
# and of the kernels package's offline warning about the same kernel; only records naming that kernel are dropped.
HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
HUB_KERNEL_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def _not_the_hub_kernel_notice(record: logging.LogRecord) -> bool:
    return HUB_KERNEL not in record.getMessage()


def one_line_per_record() -> None:
    """Call after ``logging.basicConfig``: huggingface_hub's records print once, through the root handler; the
    bitsandbytes hub-kernel notice not at all."""
    from huggingface_hub.utils import logging as hub_logging

    library = hub_logging.get_logger()  # the "huggingface_hub" logger; importing the module added its handler
    for handler in list(library.handlers):
        if type(handler) is logging.StreamHandler:
            library.removeHandler(handler)
    library.propagate = True
    for name in HUB_KERNEL_LOGGERS:
        logger = logging.getLogger(name)
        if _not_the_hub_kernel_notice not in logger.filters:
            logger.addFilter(_not_the_hub_kernel_notice)
