"""TensorFlow's start-up without its CUDA noise on machines that have no GPU.

TensorFlow 2.18 prints, on every start on a machine without a GPU, lines such as "Unable to
register cuDNN factory", "WARNING: All log messages before absl::InitializeLog() is called are
written to STDERR" and "failed call to cuInit". Some come from absl before its logging is set up,
so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them; ``TF_CPP_MIN_LOG_LEVEL=3`` would hide real errors
too. So the first ``import tensorflow`` (and its first GPU query, where cuInit runs) writes its
standard error to a temporary file, and every line of it that is not one of these known messages
is written to the real standard error afterwards. Nothing else is touched; the suite stays lazy
(TensorFlow is imported when a command first needs it, not by ``import train``).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

# What TensorFlow's CUDA plugins say while being loaded on a machine without a GPU.
CUDA_NOISE = re.compile(
    r"Unable to register cu(?:DNN|FFT|BLAS) factory"
    r"|All log messages before absl::InitializeLog\(\) is called"
    r"|Could not find cuda drivers on your machine"
    r"|failed call to cuInit"
)


@contextlib.contextmanager
def cuda_noise_filtered() -> Iterator[None]:
    """Standard error (file descriptor 2, so C++ output too) without CUDA start-up noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured:
                if not CUDA_NOISE.search(line.decode(errors="replace")):
                    os.write(2, line)


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with its start-up noise filtered out."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with cuda_noise_filtered():
            self.loader.exec_module(module)
            # cuInit runs at the first device query; listing physical devices leaves every
            # later set-up (visible devices, memory growth, threads) open.
            module.config.list_physical_devices("GPU")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, through the usual finders, and wraps its loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        uninstall()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _QuietTensorFlowFinder()


def install() -> None:
    """Filter the noise of the first ``import tensorflow`` of this process (no-op if imported)."""
    if "tensorflow" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_FINDER)
