"""BUILD stays truthful: every module has a py_library/py_binary target, every test file a py_test,
and every listed source exists. (Bazel cannot fetch its rules offline here, so this is the check.)"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("distserve_jax", "pallas_kernels", "serving")


def _targets():
    tree = ast.parse((ROOT / "BUILD").read_text(), filename="BUILD")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.startswith("py_"):
            kw = {k.arg: k.value for k in node.keywords}
            srcs = [e.value for e in kw["srcs"].elts] if "srcs" in kw else []
            out.append((node.func.id, ast.literal_eval(kw["name"]), srcs))
    return out


def _sources(kind):
    return {s for k, _, srcs in _targets() if k == kind for s in srcs}


def test_every_module_has_a_library_or_binary_target():
    listed = _sources("py_library") | _sources("py_binary")
    modules = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    modules |= {str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.py")}
    missing = sorted(modules - listed)
    assert not missing, f"modules with no BUILD target: {missing}"


def test_every_test_file_has_a_py_test_target():
    tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    missing = sorted(tests - _sources("py_test"))
    assert not missing, f"test files with no py_test target: {missing}"


def test_every_listed_source_exists_and_names_are_unique():
    names = [n for _, n, _ in _targets()]
    assert len(names) == len(set(names)), "duplicate target names"
    for kind, name, srcs in _targets():
        for s in srcs:
            assert (ROOT / s).is_file(), f"{kind} {name} lists {s}, which does not exist"
