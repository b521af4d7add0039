"""The arrows of the README's layout hold: cli -> api -> train/ gan/ infer/ report/ -> models/ data/ runs.

Read from the source with `ast`, so a lazy import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import visionflow

PACKAGE = Path(visionflow.__file__).parent

# (who, what it must not import, why)
RULES = [
    ({"models"}, {"data", "train", "infer", "gan", "report", "api", "cli"}, "a network knows tensors, not files"),
    ({"data"}, {"models", "train", "infer", "gan", "report", "api", "cli"}, "data knows no network and no training loop"),
    ({"infer"}, {"train", "gan", "api", "cli"}, "labelling needs no training code"),
    ({"train", "gan", "report", "runs", "config", "devices", "errors"}, {"api", "cli"}, "the parts sit below the API"),
    ({"api"}, {"cli"}, "the API sits below the command line"),
]


def imported_parts(path: Path) -> set[str]:
    """The top-level visionflow modules or packages `path` imports (visionflow.data.loading -> "data")."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "visionflow" else [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        parts |= {name.split(".")[1] for name in names if name.startswith("visionflow.")}
    return parts


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_imports_point_one_way_as_the_readme_says():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30 and any(part_of(m) == "api" for m in modules)  # the walk found the package
    broken = []
    for module in modules:
        part, imported = part_of(module), imported_parts(module)
        for who, forbidden, why in RULES:
            if part in who:
                broken += [f"{module.relative_to(PACKAGE)} imports visionflow.{bad} ({why})" for bad in sorted(imported & forbidden)]
    assert not broken, "\n".join(broken)


def test_the_layout_check_sees_a_wrong_arrow(tmp_path):
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def f():\n    from visionflow.api import train\n    from visionflow import cli, data\n")
    assert imported_parts(wrong) == {"api", "cli", "data"}


def test_importing_the_api_leaves_the_callers_matplotlib_backend_alone():
    """A notebook's backend stays its own: the run's pictures are drawn on figures that need no pyplot."""
    import subprocess
    import sys

    code = ("import matplotlib, sys; matplotlib.use('svg'); import visionflow.api; "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["svg", "False"], result.stderr
