"""The commands' log: every library record once, in the log's format.

huggingface_hub gives its loggers a handler of their own and lets them propagate too, so after
``logging.basicConfig`` each of its warnings (the hub's "Retrying in 1s [Retry 1/5]") prints twice, once bare and
once formatted. :func:`one_line_per_record` drops the library's own handler: its records reach the root handler
only.
"""

from __future__ import annotations

import logging


def one_line_per_record() -> None:
    """Call after ``logging.basicConfig``: huggingface_hub's records print once, through the root handler."""
    from huggingface_hub.utils import logging as hub_logging

    library = hub_logging.get_logger()  # the "huggingface_hub" logger; importing the module added its handler
    for handler in list(library.handlers):
        if type(handler) is logging.StreamHandler:
            library.removeHandler(handler)
    library.propagate = True
