"""The tree shows the architecture (README.md, "Layout"), and stays that way.

* ``experiments/`` holds the commands at its top level (each has a ``__main__``
  guard, so ``python -m experiments.<name>`` runs it) and every helper in a
  subpackage named by its role; no helper has a ``__main__``.
* No module of ``experiments/`` is over 250 lines, no function over 60.
* ``ounl_jax/attacks/zoo.py`` is under 400 lines.
* ``tests/`` mirrors the tree: a test in ``tests/<a>/<b>/`` tests package ``a.b``,
  which exists.
"""

import ast
import pathlib

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents
            if (p / "pyproject.toml").exists())
MAX_MODULE_LINES = 250
MAX_FUNCTION_LINES = 60


def _is_command(path: pathlib.Path) -> bool:
  tree = ast.parse(path.read_text())
  return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
             for node in tree.body)


def test_experiments_top_level_holds_only_commands():
  top = sorted(p for p in (ROOT / "experiments").glob("*.py")
               if p.name != "__init__.py")
  assert top, "no command found"
  not_commands = [p.name for p in top if not _is_command(p)]
  assert not not_commands, f"helpers at experiments/ top level: {not_commands}"
  helpers = [p for p in (ROOT / "experiments").glob("*/**/*.py")]
  assert not [str(p) for p in helpers if _is_command(p)]


def test_experiments_modules_and_functions_stay_small():
  too_long = []
  for path in sorted((ROOT / "experiments").rglob("*.py")):
    text = path.read_text()
    if len(text.splitlines()) > MAX_MODULE_LINES:
      too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                          f"{length} lines")
  assert not too_long, "\n".join(too_long)


def test_zoo_module_stays_under_400_lines():
  assert len((ROOT / "ounl_jax/attacks/zoo.py").read_text().splitlines()) < 400


def test_tests_mirror_the_tree():
  folders = {p.parent for p in (ROOT / "tests").rglob("test_*.py")}
  missing = [str(f.relative_to(ROOT)) for f in folders
             if f != ROOT / "tests"
             and not (ROOT / f.relative_to(ROOT / "tests") / "__init__.py").exists()]
  assert not missing, f"test folders with no package of that path: {missing}"
  assert all((f / "__init__.py").exists() for f in folders)
