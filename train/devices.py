"""What the job was given versus what TensorFlow sees: ``--require-gpu``.

A cluster job that asked for GPUs and whose TensorFlow finds none (no ``--nv``, a CPU-only
TensorFlow build, a driver older than the CUDA TensorFlow was built with) would otherwise train
on the CPU, silently, for the whole allocation. ``python -m train.devices`` prints the count
(the job templates run it before staging any data).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from train.runtime import RunError  # noqa: E402  (after the Keras choice, as train.train)


class NoGpuError(RunError):
    """GPUs were required and TensorFlow sees none (a start-up error: exit status 2)."""


def visible_gpus() -> list[str]:
    """Names of the GPUs TensorFlow can use in this process."""
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def require_gpu() -> list[str]:
    """The visible GPUs; NoGpuError naming the likely causes when there are none."""
    gpus = visible_gpus()
    if not gpus:
        import tensorflow as tf

        cuda = tf.sysconfig.get_build_info().get("cuda_version", "none (CPU-only build)")
        raise NoGpuError(
            "GPUs were required (--require-gpu) but TensorFlow sees none "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, "
            f"TensorFlow built with CUDA {cuda}). Run the GPU image with --nv, check that the "
            "node's NVIDIA driver supports that CUDA version (nvidia-smi), or train on CPUs "
            "without --require-gpu (the suite's .venv is a CPU environment)"
        )
    return gpus


def main() -> int:
    """Print the number of GPUs TensorFlow sees (exit 0)."""
    print(f"KITS_GPUS {len(visible_gpus())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
