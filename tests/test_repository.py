"""The newcomer's path: the README's two commands, CI running the second verbatim, the
command line and the example training script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# shardstep's folders; they install as shardstep.<folder> and are never imported bare, where
# a user's or another distribution's package of the same name would win (or lose)
PACKAGE_FOLDERS = ("service", "workers", "checkpoints")
BARE_IMPORT = re.compile(rf"^\s*(from|import)\s+({'|'.join(PACKAGE_FOLDERS)})(\.|\s|$)", re.M)
BARE_MODULE_RUN = re.compile(rf"-m[\"']?[,\s]+[\"']?({'|'.join(PACKAGE_FOLDERS)})\.")


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    run, test = _readme_commands()
    # nothing but prose comes before the two commands
    assert text.index(run) < text.index(test) < text.index("##")
    assert "python3 -m venv .venv" in run and "examples/" in run
    assert "python3 -m venv .venv" in test and "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = _readme_commands()
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in lines


def test_runtime_dependencies_never_include_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"]).lower()
    assert "torch" not in runtime
    for name in ("ray", "numpy", "msgpack"):
        assert name in runtime
    assert project["optional-dependencies"]["parity"] == ["torch==2.13.0"]


def test_product_code_never_imports_torch():
    """Three modules use the torch extra (torch files; a torch module as a job's model; the
    modular-addition task's torch.nn twin, ``torch_module()``), and they import torch inside
    their functions only: importing every product module leaves torch unimported."""
    offenders = []
    for package in PACKAGE_FOLDERS:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if path.relative_to(ROOT).as_posix() in ("checkpoints/torch_files.py", "workers/tasks/torch_model.py",
                                                   "workers/tasks/modular_addition.py"):
                if re.search(r"^(import torch|from torch)", text, flags=re.M):
                    offenders.append(f"{path.relative_to(ROOT)} (at its top level)")
            elif re.search(r"^\s*(import torch|from torch)", text, flags=re.M):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    modules = [f"shardstep.{path.relative_to(ROOT).with_suffix('').as_posix().replace('/', '.')}"
               for package in PACKAGE_FOLDERS for path in (ROOT / package).rglob("*.py")
               if path.name != "__init__.py" and "data" not in path.parts]
    probe = ("import importlib, sys\n"
             f"for name in {modules!r}: importlib.import_module(name)\n"
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def _repository_files(*suffixes: str) -> list[Path]:
    skip = {".git", ".venv", "build", "dist", "__pycache__"}
    return [path for path in ROOT.rglob("*") if path.is_file() and not skip.intersection(path.parts)
            and (path.suffix in suffixes or path.name.startswith("Dockerfile") or path.parent.name == ".ci")]


def _bare_imports(path: Path, base: Path = ROOT) -> list[str]:
    """Imports of a top-level service/workers/checkpoints module, and import_module calls
    that name one, in one Python file."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args):
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names = [first.value]
            elif isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
                names = [str(first.values[0].value)]
        found += [f"{path.relative_to(base)}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] in PACKAGE_FOLDERS]
    return found


def test_every_import_goes_through_the_shardstep_namespace():
    offenders = []
    for path in _repository_files(".py"):
        if path.suffix == ".py":
            offenders += _bare_imports(path)
    for path in _repository_files(".md", ".toml", ".yaml", ".yml", ".sh", ".py"):
        text = path.read_text()
        if path.suffix != ".py":
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in BARE_IMPORT.finditer(text)]
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in BARE_MODULE_RUN.finditer(text)]
    assert offenders == []


def test_the_checker_finds_bare_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import checkpoints\nfrom workers.optim import Adam\nimport importlib\n"
                      "importlib.import_module(f'service.{1}')\nfrom shardstep import checkpoints as c\n")
    found = [line.split(": ", 1)[1] for line in _bare_imports(sample, tmp_path)]
    assert found == ["checkpoints", "workers.optim", "service."]
    assert BARE_MODULE_RUN.search(f'["python", "-m", "{PACKAGE_FOLDERS[0]}.cli"]') and not BARE_MODULE_RUN.search("-m shardstep.service.cli")
    assert BARE_IMPORT.search("```python\nfrom workers.nn import Linear\n") and not BARE_IMPORT.search("from shardstep.workers.nn import Linear")


def _is_test_module(name: str) -> bool:
    """tests.test_x, or a test module in a package under tests/ (pytest collects those too)."""
    parts = name.split(".")
    return parts[0] == "tests" and any(part.startswith("test_") for part in parts[1:])


def _test_module_imports(path: Path, base: Path = ROOT) -> list[str]:
    """Imports of a test module (``tests.test_*``) anywhere in one Python file, inside
    functions too: ``import tests.test_x``, ``from tests.test_x import ...``, ``from tests
    import test_x``, their relative forms, and import_module calls that name one."""
    import ast

    relative = path.relative_to(base)
    package = list(relative.parent.parts)  # the package the file is in: tests, tests.parity, ...
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # level 1 is the file's own package, each further level one up
                anchor = package[:len(package) - node.level + 1] if node.level <= len(package) else ["."]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # from a test module, or a test module taken from its package (from tests import test_x)
            names = [module] if _is_test_module(module) else [f"{module}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        found += [f"{relative}:{node.lineno}: {name}" for name in names if _is_test_module(name)]
    return found


def test_no_file_under_tests_imports_a_test_module():
    """Test modules are what pytest collects; nothing imports one. What several test modules
    share lives in a helper module (tests/runs.py, tests/ray_heads.py, tests/small_tasks.py,
    tests/supervised_jobs.py, tests/parity/, tests/checkpoints/, ...), and shared fixtures
    in tests/conftest.py."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if "__pycache__" not in path.parts:
            offenders += _test_module_imports(path)
    assert offenders == [], ("these files import a test module; move what they take into a helper module "
                             "under tests/ (or a fixture into tests/conftest.py) and import it from there:\n"
                             + "\n".join(offenders))


def test_the_checker_finds_imports_of_test_modules(tmp_path):
    sample = tmp_path / "tests" / "parity" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text("import os\nimport tests.test_a\nimport json, tests.test_b as b\nfrom tests.test_c import helper\n"
                      "from tests import runs, test_d\nfrom . import optim_cases\nfrom .. import test_e\n"
                      "from ..test_f import g, h\nfrom tests.testing import x\nimport tests_test_y\n"
                      "from tests.parity.test_like import z\nimport importlib\n\n\ndef later():\n"
                      "    from tests.test_g import fixture\n    return importlib.import_module('tests.test_h')\n")
    found = _test_module_imports(sample, tmp_path)
    assert sorted(line.split(": ", 1)[1] for line in found) == [
        "tests.parity.test_like", "tests.test_a", "tests.test_b", "tests.test_c", "tests.test_d", "tests.test_e",
        "tests.test_f", "tests.test_g", "tests.test_h"]
    assert all(line.startswith(f"{Path('tests/parity/sample.py')}:") for line in found)


def test_packaging_lists_every_package_folder_under_the_namespace():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {f"shardstep.{name}": name for name in PACKAGE_FOLDERS}
    folders = sorted("shardstep." + ".".join(init.parent.relative_to(ROOT).parts)
                     for name in PACKAGE_FOLDERS for init in (ROOT / name).rglob("__init__.py"))
    assert sorted(config["packages"]) == folders
    assert set(config["package-data"]) <= set(folders)
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"] == {
        "shardstep": "shardstep.service.cli:entry"}


def test_the_built_wheel_installs_only_the_shardstep_namespace(tmp_path):
    """The distribution a user installs: every module under shardstep/, the tasks' data
    beside them, nothing at the top level that another distribution could own."""
    import shutil
    import zipfile

    # from a copy of what the build reads: a build/ folder left in the checkout must not count
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in PACKAGE_FOLDERS:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.nb[ic]"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path), str(source)], check=True, capture_output=True, timeout=300,
                   cwd=tmp_path)
    (wheel,) = tmp_path.glob("shardstep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"shardstep", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    assert "shardstep/__init__.py" not in names  # a namespace: nothing of its own
    # every module of every package (data/ holds files, not a package)
    expected = {f"shardstep/{path.relative_to(ROOT).as_posix()}" for name in PACKAGE_FOLDERS
                for path in (ROOT / name).rglob("*.py") if (path.parent / "__init__.py").exists()}
    assert expected <= set(names), sorted(expected - set(names))
    assert "shardstep/workers/tasks/data/digits.npz" in names


def test_cli_prints_its_version():
    out = subprocess.run([sys.executable, "-m", "shardstep.service.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert re.fullmatch(r"shardstep \d+\.\d+\.\d+\n", out.stdout)


def test_example_training_script_learns():
    out = subprocess.run([sys.executable, "examples/train_classifier.py", "--epochs", "40"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=300)
    accuracy = float(re.search(r"final training accuracy ([0-9.]+)", out.stdout).group(1))
    first_loss = float(re.search(r"epoch\s+1\s+loss ([0-9.]+)", out.stdout).group(1))
    last_loss = float(re.findall(r"loss ([0-9.]+)", out.stdout)[-1])
    # three spirals are not linearly separable (a linear model reaches about 0.5)
    assert accuracy >= 0.9, out.stdout
    assert last_loss < first_loss / 3, out.stdout


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "examples" / "jobs").glob("*.toml")))
def test_every_example_job_runs_to_completion(job, tmp_path, ray_address):
    """Each example job file runs through the command line; digits (the README's first command)
    on Ray, the others inline."""
    backend = "ray" if job == "digits.toml" else "inline"
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    out = subprocess.run([sys.executable, "-m", "shardstep.service.cli", "run", f"examples/jobs/{job}", "--run-dir",
                          str(tmp_path / "run"), "--backend", backend, "--quiet"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert re.match(r"done: \d+ steps", out.stdout), out.stdout
    assert (tmp_path / "run" / "checkpoints").is_dir()
    if job == "digits.toml":
        assert float(re.search(r"accuracy ([0-9.]+)", out.stdout).group(1)) >= 0.9, out.stdout


def test_readme_job_snippets_validate():
    from shardstep.service.jobspec import parse_job

    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    for block in blocks:  # relative paths as in examples/jobs/ (the README's data lives in examples/data/)
        parse_job(block, source="README.md", base_dir=ROOT / "examples" / "jobs")
