"""Which names a ``%%decompute`` cell sends and brings back (``notebook_ext.cell_analysis``)."""

from __future__ import annotations

import pytest

from notebook_ext.cell_analysis import analyze, split_names


def test_reads_before_assignment_are_sent_and_assignments_come_back() -> None:
    a = analyze("y = x + 1\nz = y * 2\n")
    assert a.reads == ("x",)
    assert a.assigns == ("y", "z")


def test_function_parameters_and_locals_are_not_reads() -> None:
    a = analyze("def f(a, *rest, k=default):\n    b = a + glob\n    return b\nr = f(1)")
    assert set(a.reads) == {"default", "glob"}
    assert a.assigns == ("f", "r")


def test_comprehension_targets_and_lambda_parameters_are_local() -> None:
    a = analyze("out = [i * n for i in data if i]\nf = lambda v: v + w\n")
    assert {"n", "data", "w"} <= set(a.reads)
    assert not {"i", "v"} & set(a.reads)


def test_walrus_in_a_comprehension_binds_the_cell() -> None:
    a = analyze("[last := v for v in data]")
    assert "last" in a.assigns and "v" not in a.assigns


def test_augmented_assignment_reads_first() -> None:
    a = analyze("total += 1")
    assert a.reads == ("total",) and a.assigns == ("total",)


def test_a_conditional_binding_does_not_hide_a_later_read() -> None:
    a = analyze("if flag:\n    w = 1\nprint(w)")
    assert "w" in a.reads and "w" in a.assigns


def test_global_written_by_a_function_comes_back() -> None:
    a = analyze("def bump():\n    global counter\n    counter = counter + 1\nbump()")
    assert "counter" in a.assigns and "counter" in a.reads


def test_methods_read_globals_not_class_attributes() -> None:
    a = analyze("class C:\n    attr = base\n    def m(self):\n        return attr\n")
    assert {"base", "attr"} <= set(a.reads)
    assert a.assigns == ("C",)


def test_except_as_and_del() -> None:
    a = analyze("try:\n    pass\nexcept Oops as e:\n    pass\ndel old")
    assert {"Oops", "old"} <= set(a.reads)
    assert "e" in a.assigns


def test_imports_run_remotely_and_are_repeated_not_pulled() -> None:
    a = analyze("import numpy as np\nfrom os import path\nimport xml.dom\nx = np.ones(2)")
    assert a.imports == ("np", "path", "xml")
    assert a.assigns == ("x",)
    assert "import numpy as np" in a.import_source and "from os import path" in a.import_source
    assert "np" not in a.reads  # bound by the cell before it is read


@pytest.mark.parametrize(("source", "last", "quiet"), [
    ("x", True, False),
    ("x;", True, True),
    ("x;  # a comment", True, True),
    ("x  # not quiet;", True, False),
    ("x = 1", False, False),
    ("for i in r:\n    i", False, False),
])
def test_last_expression_and_trailing_semicolon(source: str, last: bool, quiet: bool) -> None:
    a = analyze(source)
    assert (a.has_last_expr, a.quiet) == (last, quiet)


def test_split_names() -> None:
    assert split_names("a, b,c") == ["a", "b", "c"]
    assert split_names(None) is None
    with pytest.raises(ValueError, match="'1x'"):
        split_names("a,1x")


def test_syntax_errors_propagate() -> None:
    with pytest.raises(SyntaxError):
        analyze("x = (")
