"""Singularity/Apptainer definitions (Singularity.def, containers/Singularity.cpu.def) and
containers/build.sh.

Neither apptainer nor singularity can be installed here (stack.md), so no image is built: the
definitions are parsed (spython, plus a strict section parser, since spython silently drops
sections it does not know), their %files sources must exist, they must install exactly what
`make setup` installs (requirements.txt, setup.sh's Horovod and pip), their shell sections must be
valid POSIX sh (Singularity runs them with /bin/sh), and the run script and environment are
executed by sh to check what they do.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

DEFS = {"gpu": ROOT / "Singularity.def", "cpu": ROOT / "containers" / "Singularity.cpu.def"}
SECTIONS = ("files", "labels", "help", "environment", "post", "runscript", "test")
SUITE = "/opt/kits-suite"


def stages(path: Path) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(header keys, {section: body}) of each stage of a definition file; a new stage starts at
    each ``Bootstrap:`` line. ``%files from STAGE`` is the section ``files from STAGE``."""
    out: list[tuple[dict[str, str], dict[str, list[str]]]] = []
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"^%(\w+(?: from \w+)?)\s*$", line)
        if line.startswith("Bootstrap:"):
            out.append(({}, {}))
            current = None
        if m:
            current = m.group(1)
            assert current not in out[-1][1], f"{path.name}: section %{current} twice in a stage"
            out[-1][1][current] = []
        elif current is None:
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition(":")
                out[-1][0][key.strip()] = value.strip()
        else:
            out[-1][1][current].append(line)
    return [(h, {k: "\n".join(v).strip("\n") for k, v in b.items()}) for h, b in out]


def sections(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(first stage's header, {section: body}), each section's bodies of all stages joined."""
    parts = stages(path)
    body: dict[str, str] = {}
    for _, stage_body in parts:
        for name, text in stage_body.items():
            body[name] = f"{body[name]}\n{text}" if name in body else text
    return parts[0][0], body


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def setup_sh_value(pattern: str) -> str:
    m = re.search(pattern, (ROOT / "scripts" / "setup.sh").read_text(), re.M)
    assert m, pattern
    return m.group(1)


HOROVOD_VERSION = setup_sh_value(r'^HOROVOD_VERSION="([\d.]+)"')
PIP_PIN = setup_sh_value(r'"(pip==[\d.]+)"')


@pytest.mark.parametrize("variant", DEFS)
def test_definition_parses_with_spython(variant):
    from spython.main.parse.parsers import SingularityParser

    recipes = list(SingularityParser(str(DEFS[variant])).recipe.values())
    first, last = recipes[0], recipes[-1]
    parts = stages(DEFS[variant])
    assert len(recipes) == len(parts) == (2 if variant == "gpu" else 1)
    for recipe, (header, _) in zip(recipes, parts, strict=True):
        assert header["Bootstrap"] == "docker"
        assert recipe.fromHeader == header["From"]
        expected_base = "nvidia/cuda:12" if variant == "gpu" else "python:3.11-slim"
        assert recipe.fromHeader.startswith(expected_base), recipe.fromHeader
        assert recipe.install
    assert first.files and last.labels and last.cmd and last.test
    assert "TF_USE_LEGACY_KERAS=1" in last.environ
    assert f"PYTHONPATH={SUITE}" in last.environ


def test_gpu_image_builds_in_a_devel_stage_and_runs_on_the_runtime_base():
    """Horovod is compiled in the CUDA devel stage; the final image is the same CUDA version's
    runtime base with the built /opt/venv and the suite copied in, and no compiler."""
    (build_header, build), (final_header, final) = stages(DEFS["gpu"])
    assert build_header["Stage"] == "build" and final_header["Stage"] == "final"
    devel = re.fullmatch(
        r"nvidia/cuda:(\d+\.\d+\.\d+)-devel-(ubuntu\d+\.\d+)", build_header["From"]
    )
    runtime = re.fullmatch(
        r"nvidia/cuda:(\d+\.\d+\.\d+)-runtime-(ubuntu\d+\.\d+)", final_header["From"]
    )
    assert devel and runtime, (build_header["From"], final_header["From"])
    assert devel.groups() == runtime.groups(), "both stages must have the same CUDA and Ubuntu"
    assert '"horovod==$HOROVOD_VERSION"' in build["post"]
    assert "HOROVOD_VERSION" not in final["post"], "Horovod is built in the build stage only"
    copied = [line.split() for line in final["files from build"].splitlines() if line.strip()]
    assert ["/opt/venv", "/opt/venv"] in copied and [SUITE, SUITE] in copied
    for build_only in ("g++", "cmake", "libopenmpi-dev", "python3.11-dev", "pip install"):
        assert build_only not in final["post"], f"{build_only} in the final stage"
    # the interpreter the venv was made with is installed in the final stage too
    assert "python3.11" in final["post"] and "python3.11 -m venv /opt/venv" in build["post"]


@pytest.mark.parametrize("variant", DEFS)
def test_definition_has_every_section_and_valid_shell(variant, tmp_path):
    _, body = sections(DEFS[variant])
    for name in SECTIONS:
        assert body.get(name, "").strip(), f"%{name} missing or empty"
    for name in ("environment", "post", "runscript", "test"):
        script = tmp_path / f"{name}.sh"
        script.write_text(body[name] + "\n")
        # Singularity runs these with /bin/sh (dash on Debian/Ubuntu): POSIX sh, no bashisms
        for shell in ("sh", "bash"):
            proc = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
            assert proc.returncode == 0, f"%{name} ({shell}): {proc.stderr}"
    # the self-test imports the suite and checks Horovod's build
    assert "import preprocess, models, train" in body["test"]
    assert "horovodrun --check-build" in body["test"]


@pytest.mark.parametrize("variant", DEFS)
def test_files_name_only_existing_repository_paths(variant):
    _, body = sections(DEFS[variant])
    sources = []
    for line in body["files"].splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        src, dst = line.split()
        assert (ROOT / src).exists(), f"%files source {src} does not exist in the repository"
        assert dst == f"{SUITE}/{src}", f"{src} -> {dst}: expected {SUITE}/{src}"
        sources.append(src)
    needed = {"preprocess", "models", "train", "jobs", "requirements.txt", "scripts"}
    assert needed <= set(sources), needed - set(sources)


@pytest.mark.parametrize("variant", DEFS)
def test_definition_installs_the_pins_of_make_setup(variant):
    text = DEFS[variant].read_text()
    header, body = sections(DEFS[variant])
    post = body["post"]
    pins = requirement_pins()

    # the pinned requirements file itself, no retyped list
    assert re.search(r'pip install [^\n]*-r "?(\$SUITE|/opt/kits-suite)/requirements\.txt', post)
    # run the %post lines that read the pins, against this repository
    assigns = [
        line.strip()
        for line in post.splitlines()
        if re.match(r"\s*(SUITE|TF_VERSION|HOROVOD_VERSION|PIP_VERSION)=", line)
    ]
    script = "\n".join(assigns).replace(SUITE, str(ROOT))
    script += '\necho "TF=${TF_VERSION:-} HVD=${HOROVOD_VERSION:-} PIP=${PIP_VERSION:-}"\n'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    got = dict(item.split("=", 1) for item in out.split())
    assert got["HVD"] == HOROVOD_VERSION
    assert got["PIP"] == PIP_PIN
    assert re.search(r'"horovod==\$HOROVOD_VERSION"', post)
    for flag in ("HOROVOD_WITH_TENSORFLOW=1", "HOROVOD_WITH_MPI=1", "HOROVOD_WITH_GLOO=1"):
        assert flag in post
    assert "--no-build-isolation" in post
    if variant == "gpu":
        assert got["TF"] == pins["tensorflow"]
        assert '"tensorflow[and-cuda]==$TF_VERSION"' in post
        assert "HOROVOD_GPU_OPERATIONS=NCCL" in post

    # any version written out in the file equals the repository's pin
    for name, version in re.findall(r"\b([A-Za-z][\w.-]*(?:\[[\w,-]+\])?)==([0-9][\w.]*)", text):
        base = name.split("[")[0].lower()
        want = {"horovod": HOROVOD_VERSION, "pip": PIP_PIN.split("==")[1]}.get(base, pins.get(base))
        assert want == version, f"{name}=={version} in {DEFS[variant].name}, pinned {want}"
    labels = dict(line.split(None, 1) for line in body["labels"].splitlines() if line.strip())
    assert labels["TensorFlow"] == pins["tensorflow"]
    assert labels["tf-keras"] == pins["tf-keras"]
    assert labels["Horovod"] == HOROVOD_VERSION
    import preprocess

    assert labels["org.opencontainers.image.version"] == preprocess.__version__


@pytest.mark.parametrize("variant", DEFS)
def test_environment_section_sets_the_suite_up(variant, tmp_path):
    _, body = sections(DEFS[variant])
    script = tmp_path / "env.sh"
    script.write_text(body["environment"] + "\nenv\n")
    out = subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", "sh", str(script)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["TF_USE_LEGACY_KERAS"] == "1"
    assert env["PYTHONPATH"] == SUITE
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.parametrize("variant", DEFS)
def test_runscript_forwards_to_the_suite_modules(variant, tmp_path):
    """`singularity run IMAGE preprocess.verify DIR` is `python -m preprocess.verify DIR`."""
    _, body = sections(DEFS[variant])
    script = tmp_path / "runscript.sh"
    script.write_text(body["runscript"] + "\n")
    venv_bin = ROOT / ".venv" / "bin"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{venv_bin}:{os.environ['PATH']}")

    def run(*args):
        return subprocess.run(["sh", str(script), *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)  # fmt: skip

    proc = run("preprocess.verify", "--help")
    assert proc.returncode == 0 and "usage: python -m preprocess.verify" in proc.stdout
    proc = run("preprocess.verify", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "error:" in proc.stderr  # verify's own "not a dataset"
    proc = run("python", "-c", "import sys; print('args', sys.argv[1:])", "a", "b")
    assert proc.stdout.strip() == "args ['a', 'b']"
    proc = run("rm", "-rf", "/")
    assert proc.returncode == 2 and "unknown command" in proc.stderr
    proc = run()
    assert proc.returncode == 2 and "usage:" in proc.stdout


# --- build.sh ---------------------------------------------------------------------------------
def test_build_script_without_apptainer_or_singularity_says_so(tmp_path):
    if any(shutil.which(t, path="/usr/bin:/bin") for t in ("apptainer", "singularity")):
        pytest.skip("apptainer/singularity is installed in /usr/bin")
    proc = subprocess.run(
        [str(ROOT / "containers" / "build.sh"), "cpu"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path,
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 127
    assert "neither apptainer nor singularity is installed" in proc.stderr
    assert "make setup" in proc.stderr


@pytest.mark.parametrize(
    "args, definition, output",
    [
        ([], "Singularity.def", "kits-suite.sif"),
        (["gpu", "img/gpu.sif"], "Singularity.def", "img/gpu.sif"),
        (["cpu"], "containers/Singularity.cpu.def", "kits-suite-cpu.sif"),
    ],
)
def test_build_script_chooses_the_definition(tmp_path, args, definition, output):
    """With an `apptainer` on PATH (a recorder: none can be installed here), build.sh runs
    `apptainer build [--fakeroot] OUT DEF` from the repository root."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "called"
    (bin_dir / "apptainer").write_text(f'#!/bin/sh\n{{ pwd; echo "$@"; }} > {record}\n')
    (bin_dir / "apptainer").chmod(0o755)
    proc = subprocess.run(
        [str(ROOT / "containers" / "build.sh"), *args],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path,
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cwd, argv = record.read_text().splitlines()
    assert Path(cwd) == ROOT
    fakeroot = [] if os.geteuid() == 0 else ["--fakeroot"]
    assert argv.split() == ["build", *fakeroot, str(tmp_path / output), definition]
    assert (ROOT / definition).is_file()
