"""The repository folder ``kernels/`` never shadows Hugging Face's ``kernels`` package, and ``dylora_moe.kernels``
imports from a source checkout, an editable install and a wheel.

Each case is a subprocess started where a user would start it (the repository root, or elsewhere for installs),
because the clash lives in ``sys.path[0]``, which only a fresh interpreter sets up the way a user's does.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from train_support import TINY

REPO = Path(__file__).resolve().parents[1]

CHECK_IMPORTS = """
from transformers import LlamaForCausalLM
import dylora_moe.kernels as ops
try:
    import kernels
    print(getattr(kernels, "__file__", None))
except ModuleNotFoundError:
    print("absent")

print(ops.__file__)
print(callable(ops.moe_lora) and callable(ops.topk_route))
"""


def _hf_kernels_file() -> str | None:
    """Where Hugging Face's `kernels` is installed (transformers >= 5.25 depends on it), or None."""
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(Path(distribution.locate_file("kernels/__init__.py")).resolve())


requires_hf_kernels = pytest.mark.skipif(
    _hf_kernels_file() is None, reason="Hugging Face's `kernels` is not installed (transformers < 5.25 needs none)"
)


def _run(args, cwd=REPO, timeout=300, **kwargs):
    env = {**os.environ, "PYTHONPATH": ""} | kwargs.pop("env", {})
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _assert_both_kernels(output: str, ops_root: Path, cwd: Path = REPO):
    kernels_file, ops_file, callables = output.strip().splitlines()[-3:]
    if _hf_kernels_file() is None:  # from the root an empty namespace package (transformers: "not installed")
        assert kernels_file == ("None" if cwd == REPO else "absent")
    else:
        assert str(Path(kernels_file).resolve()) == _hf_kernels_file()
    assert Path(ops_file).resolve().is_relative_to(ops_root.resolve()), ops_file
    assert callables == "True"


def test_python_c_in_the_repository_root():
    _assert_both_kernels(_run([sys.executable, "-c", CHECK_IMPORTS]), REPO)


def test_interactive_session_in_the_repository_root():
    output = _run([sys.executable, "-i", "-q"], input=CHECK_IMPORTS)
    _assert_both_kernels(output, REPO)


@requires_hf_kernels
def test_hub_kernels_api_used_by_transformers_loads():
    """transformers imports these names from `kernels` when a model class loads (integrations.hub_kernels)."""
    _run([sys.executable, "-c", "from kernels import CUDAProperties, LayerRepository, Mode, kernelize"])


@requires_hf_kernels
def test_submodules_of_hub_kernels_resolve_to_the_installed_package():
    output = _run([sys.executable, "-c", "import kernels.benchmark as b; print(b.__file__)"])
    assert Path(output.strip()).resolve().parent == Path(_hf_kernels_file()).parent


def test_train_py_from_the_repository_root(tmp_path):
    _run([sys.executable, "train.py", *TINY, "--max_steps", "1", "--output_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "final").is_dir()


def test_pytest_collects_from_the_repository_root():
    output = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "--collect-only",
            "-p",
            "no:cacheprovider",
            "tests/modules/test_inject.py",
        ]
    )
    assert "test_inject.py" in output


def test_benchmark_script_from_the_repository_root():
    args = ["--vocab", "500", "--hidden", "32", "--rows", "1", "--length", "16", "--repeats", "1"]
    output = _run([sys.executable, "-m", "benchmarks.fused_loss_memory", *args])
    assert "|" in output


def test_bare_kernels_without_hub_kernels_is_an_empty_namespace(tmp_path):
    """In an interpreter with no `kernels` installed, `import kernels` from the root gives what a bare folder gives
    (an empty namespace package: no file, no version, no names), which transformers reads as not installed."""
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)
    check = (
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, '__version__')\n"
        "assert list(kernels.__path__) == []\n"
        "try:\n    from kernels import CUDAProperties\nexcept ImportError:\n    print('no names')\n"
        "try:\n    import kernels.ops\nexcept ModuleNotFoundError:\n    print('no submodules')\n"
    )
    output = _run([str(bare / "bin" / "python"), "-c", check])
    assert output.split() == ["no", "names", "no", "submodules"]


def test_editable_install_from_elsewhere(tmp_path):
    read_url = "import importlib.metadata as m; print(m.distribution('dylora-moe').read_text('direct_url.json'))"
    direct_url = _run([sys.executable, "-c", read_url], cwd=tmp_path).strip()  # away from the checkout's egg-info
    if direct_url == "None" or not json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip("dylora-moe is not installed in editable mode here (the README's set-up: pip install -e .)")
    _assert_both_kernels(_run([sys.executable, "-c", CHECK_IMPORTS], cwd=tmp_path), REPO, tmp_path)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)], timeout=600)
    (built,) = out.glob("dylora_moe-*.whl")
    return built


def test_wheel_holds_no_top_level_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "dylora_moe/kernels/__init__.py" in names and "dylora_moe/kernels/ops.py" in names
    assert not [name for name in names if name.startswith("kernels/")]


def test_wheel_install_from_elsewhere(wheel, tmp_path):
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)])
    output = _run([sys.executable, "-c", CHECK_IMPORTS], cwd=tmp_path, env={"PYTHONPATH": str(target)})
    _assert_both_kernels(output, target, tmp_path)
