"""train.tf_startup: TensorFlow's CUDA start-up noise does not reach the terminal; the rest does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from train.tf_startup import CUDA_NOISE, cuda_noise_filtered

# What TensorFlow 2.18 prints on a machine without a GPU (each must be recognised).
NOISE_LINES = [
    "2026-12-01 14:57:53.335036: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:477] "
    "Unable to register cuFFT factory: Attempting to register factory for plugin cuFFT when one "
    "has already been registered",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "E0000 00:00:1796137073.350987   10999 cuda_dnn.cc:8310] Unable to register cuDNN factory: "
    "Attempting to register factory for plugin cuDNN when one has already been registered",
    "E0000 00:00:1796137073.355618   10999 cuda_blas.cc:1418] Unable to register cuBLAS factory: "
    "Attempting to register factory for plugin cuBLAS when one has already been registered",
    "2026-12-01 14:57:57.214712: E external/local_xla/xla/stream_executor/cuda/cuda_driver.cc:152]"
    " failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "2026-12-01 14:57:53.321138: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could not "
    "find cuda drivers on your machine, GPU will not be used.",
]


@pytest.mark.parametrize("line", NOISE_LINES)
def test_known_noise_is_recognised(line: str) -> None:
    assert CUDA_NOISE.search(line)


def test_filter_drops_noise_and_keeps_everything_else(capfd: pytest.CaptureFixture) -> None:
    with cuda_noise_filtered():
        for line in NOISE_LINES:
            os.write(2, (line + "\n").encode())
        os.write(2, b"E0000 a real error from C++\n")
        os.write(2, b"a warning\n")
        print("normal output")
    out, err = capfd.readouterr()
    assert out == "normal output\n"
    assert err == "E0000 a real error from C++\na warning\n"


def test_filter_restores_stderr_after_an_exception(capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(ImportError), cuda_noise_filtered():
        os.write(2, b"said before failing\n")
        raise ImportError("broken")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "said before failing\nafter\n"


def quiet_start(code: str, tmp_path: Path, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with no TF_CPP_MIN_LOG_LEVEL of the test run's."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env = {k: v for k, v in env.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra_env)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_no_cuda_noise(stderr: str) -> None:
    noisy = [line for line in stderr.splitlines() if CUDA_NOISE.search(line)]
    assert not noisy, "CUDA start-up noise reached stderr:\n" + "\n".join(noisy)
    for word in ("cuInit", "cuDNN", "cuBLAS", "cuFFT", "absl::InitializeLog"):
        assert word not in stderr, stderr[-3000:]


def test_training_start_up_is_quiet_without_tf_cpp_min_log_level(tmp_path: Path) -> None:
    # Horovod's import, the GPU query of init_horovod and a first op: all the places where
    # TensorFlow talks about CUDA on a machine without a GPU.
    code = (
        "import sys\n"
        "from train.runtime import init_horovod\n"
        "import tensorflow as tf\n"
        "hvd = init_horovod()\n"
        "print(int(tf.reduce_sum(tf.ones(3))), hvd.size())\n"
        "print('kept line', file=sys.stderr)\n"
    )
    proc = quiet_start(code, tmp_path)
    assert proc.stdout.split()[-2:] == ["3", "1"]
    assert_no_cuda_noise(proc.stderr)
    assert "kept line" in proc.stderr


def test_a_users_log_level_wins(tmp_path: Path) -> None:
    # the suite's default hides TensorFlow's INFO and WARNING lines; a user's value is kept (and
    # the CUDA noise stays filtered even when the user asks for everything)
    code = (
        "import os, train, tensorflow as tf\n"
        "tf.constant(1)\n"
        "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
    )
    assert quiet_start(code, tmp_path).stdout.split()[-1] == "2"
    verbose = quiet_start(code, tmp_path, TF_CPP_MIN_LOG_LEVEL="0")
    assert verbose.stdout.split()[-1] == "0"
    assert_no_cuda_noise(verbose.stderr)
