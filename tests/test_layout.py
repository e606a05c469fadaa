"""The tree a newcomer reads: no import circle in `cvg/` or `research/cvg_research/` (the layers themselves are
import-linter's, `.importlinter`), and no module too long to read in one sitting."""

from pathlib import Path

import grimp
import networkx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400


def _import_graph(package: str) -> networkx.DiGraph:
    """Who imports whom inside `package`, imports under `if TYPE_CHECKING:` left out (they never run)."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=True, cache_dir=None)
    edges = networkx.DiGraph()
    for module in graph.modules:
        edges.add_edges_from((module, imported) for imported in graph.find_modules_directly_imported_by(module))
    return edges


@pytest.mark.parametrize("package", ["cvg", "cvg_research"])
def test_no_module_imports_itself_in_a_circle(package):
    circles = [sorted(c) for c in networkx.strongly_connected_components(_import_graph(package)) if len(c) > 1]
    assert circles == []


def test_the_circle_check_finds_a_circle(tmp_path, monkeypatch):
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circle import b\n")
    (package / "b.py").write_text("def f():\n    from circle import a  # a lazy import still closes the circle\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    circles = [c for c in networkx.strongly_connected_components(_import_graph("circle")) if len(c) > 1]
    assert circles == [{"circle.a", "circle.b"}]


def test_no_module_is_over_the_length_a_reader_takes_in():
    long = {
        str(path.relative_to(ROOT)): n
        for folder in (ROOT / "cvg", ROOT / "research" / "cvg_research")
        for path in folder.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
