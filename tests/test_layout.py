"""The package layout is the architecture: imports flow one way, engine → estimators → control →
reporting → integrations → programs, and the documented public API is importable from the top level."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import curvopt

PACKAGE = Path(curvopt.__file__).resolve().parent
ORDER = ("engine", "estimators", "control", "reporting", "integrations", "programs")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Every curvopt module ``path`` imports, at module level or inside functions, resolved to absolute names."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("curvopt")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("curvopt"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` imports a module
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return ORDER.index(parts[1]) if len(parts) > 1 and parts[1] in ORDER else None


def test_every_module_lives_in_a_subpackage_named_for_its_concern():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules outside the subpackages: {loose}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ORDER)
    for name in ORDER:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"curvopt.{name} must say what lives there and what it may import"


@pytest.mark.parametrize("sub", ORDER)
def test_imports_never_reach_back_up_the_chain(sub):
    offenders = []
    for path in sorted((PACKAGE / sub).rglob("*.py")):
        own = ORDER.index(sub)
        for target in _imported_modules(path):
            layer = _layer(target)
            top_level = target == "curvopt" and sub != "programs"  # the public API re-exports everything above programs
            if top_level or (layer is not None and layer > own):
                offenders.append(f"{_module_name(path)} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_documented_public_api_is_importable_from_the_top_level():
    for name in curvopt.__all__:
        assert hasattr(curvopt, name), name


def test_import_works_from_the_folder_above_a_clone_named_curvopt(tmp_path):
    """A clone named ``curvopt/`` seen from its parent folder must not shadow the installed package."""
    root = PACKAGE.parent
    (tmp_path / "curvopt").symlink_to(root, target_is_directory=True)
    script = "import curvopt, sys; assert hasattr(curvopt, 'CurvatureAwareOptimizer'), curvopt.__path__; print('ok')"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_curvopt_and_its_integrations_never_import_timm_or_torchvision():
    """``import curvopt`` and the framework integrations work without timm and torchvision (only ``curvopt train``
    and the demo's datasets need them): no module outside programs imports them, and with both made unimportable
    an estimate still runs and the Hugging Face integration imports (Lightning's own torchmetrics imports an
    installed torchvision, so it is checked by the scan alone)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "programs" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            vision = [n for n in names if n.split(".")[0] in ("timm", "torchvision")]
            offenders += [f"{_module_name(path)} imports {n}" for n in vision]
    assert not offenders, offenders
    script = (
        "import sys; sys.modules['timm'] = None; sys.modules['torchvision'] = None\n"
        "import torch, curvopt\n"
        "m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
        "curvopt.estimate_curvature(m, torch.nn.CrossEntropyLoss(), (torch.randn(5, 3), torch.randint(0, 2, (5,))),"
        " probes=2)\n"
        "try:\n    import transformers\nexcept ImportError:\n    transformers = None\n"
        "if transformers is not None:\n    import curvopt.integrations.huggingface\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
