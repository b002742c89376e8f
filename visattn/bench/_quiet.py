"""Silence torch's CUDA_HOME guess where it cannot matter.

torch.utils.benchmark imports torch.utils.cpp_extension, which logs "No CUDA runtime is found, using
CUDA_HOME=..." at import time exactly when no CUDA device is available. Nothing in visattn.bench compiles
CUDA extensions, so on such a machine the line says nothing a user can act on; this filter drops that
one message and leaves every other log record of the logger alone.
"""

import logging


def _drop_cuda_home_guess(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("No CUDA runtime is found")


_LOGGER = logging.getLogger("torch.utils.cpp_extension")
if _drop_cuda_home_guess not in _LOGGER.filters:
    _LOGGER.addFilter(_drop_cuda_home_guess)
