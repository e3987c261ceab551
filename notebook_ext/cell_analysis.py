"""Static analysis of a ``%%decompute`` cell: what it needs from the notebook, what it gives back.

This module owns the answer to "which names travel?". It reads the cell's syntax tree (``ast``)
and never runs, imports or evaluates anything, so it is safe on any cell and costs microseconds.

- **reads**: names the cell reads from outside itself, in first-use order. A name counts when a
  statement reads it before an earlier top-level statement of the cell has certainly bound it, and
  names read inside functions, lambdas, classes and comprehensions count unless that scope binds
  them itself (parameters, locals, comprehension targets). The caller keeps the ones that exist in
  the user namespace. This over-approximates on purpose: sending a name the cell turns out not to
  need costs bytes; missing one costs a ``NameError`` on the provider.
- **assigns**: names the cell binds at top level (assignments, ``def``, ``class``, ``for`` and
  ``with`` targets, walrus, ``global`` writes from functions). These come back into the namespace.
- **imports**: top-level ``import`` statements, so the kernel can repeat them (modules themselves
  are never shipped back: a pickled module is only a reference to an import).
- **last expression**: whether the cell ends with an expression, displayed as ``Out[...]``
  unless the cell ends with ``;`` (IPython's convention).
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)
#: Top-level statements after which their targets are certainly bound (no branch can skip them).
_DEFINITE = (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Import, ast.ImportFrom,
             ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.AsyncWith)


@dataclass(frozen=True, slots=True)
class CellAnalysis:
    """What a cell reads from and writes to the namespace around it."""

    reads: tuple[str, ...]
    assigns: tuple[str, ...]
    imports: tuple[str, ...]
    import_source: str
    has_last_expr: bool
    quiet: bool


class _Names:
    """Names read (free in the current scope) and bound (in the current scope), in order."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.stores: list[str] = []
        self.globals: list[str] = []  # ``global`` names a nested function assigns
        self.deep: list[str] = []  # free names of function bodies: class scopes cannot bind them


def _scan(node: ast.AST, out: _Names) -> None:
    """Collect names read and bound in ``node``'s scope; nested scopes report only free reads."""
    if isinstance(node, ast.Name):
        if isinstance(node.ctx, ast.Store):
            out.stores.append(node.id)
        else:  # Load, and Del (deleting a name needs it to exist)
            out.loads.append(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        _scan_function(node, out)
    elif isinstance(node, ast.ClassDef):
        for child in [*node.decorator_list, *node.bases, *node.keywords]:
            _scan(child, out)
        out.stores.append(node.name)
        _merge_scope(node.body, [], out, function=False)
    elif isinstance(node, _COMPREHENSIONS):
        inner = _Names()
        for child in ast.iter_child_nodes(node):
            _scan(child, inner)
        # a comprehension's targets are its own; a walrus inside binds the enclosing scope
        walrus = {n.target.id for n in ast.walk(node) if isinstance(n, ast.NamedExpr)}
        targets = set(inner.stores) - walrus
        out.loads.extend(n for n in inner.loads if n not in targets)
        out.deep.extend(n for n in inner.deep if n not in targets)
        out.stores.extend(n for n in inner.stores if n in walrus)
        out.globals.extend(inner.globals)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        for alias in node.names:
            if alias.name != "*":
                out.stores.append(alias.asname or alias.name.split(".")[0])
    elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
        out.loads.append(node.target.id)  # x += 1 reads x first
        out.stores.append(node.target.id)
        _scan(node.value, out)
    elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar, ast.MatchMapping)):
        bound = node.rest if isinstance(node, ast.MatchMapping) else node.name
        if bound:  # except E as e / case [*rest] / case {**rest} / case x
            out.stores.append(bound)
        for child in ast.iter_child_nodes(node):
            _scan(child, out)
    else:
        for child in ast.iter_child_nodes(node):
            _scan(child, out)


def _scan_function(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda, out: _Names) -> None:
    args = node.args
    # decorators, defaults and annotations are evaluated where the function is defined
    outer: list[ast.AST] = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
    if not isinstance(node, ast.Lambda):
        outer += node.decorator_list
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        outer += [a.annotation for a in every if a is not None and a.annotation is not None]
        if node.returns is not None:
            outer.append(node.returns)
    for child in outer:
        _scan(child, out)
    params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a]
    params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    body = [node.body] if isinstance(node, ast.Lambda) else node.body
    if not isinstance(node, ast.Lambda):
        out.stores.append(node.name)
    _merge_scope(body, params, out, function=True)


def _merge_scope(body: list, params: list[str], out: _Names, function: bool) -> None:
    """Scan a nested scope's body; its free names become reads of the enclosing scope.

    Names bound in a class body are invisible to the methods inside it, so free names that
    come from function bodies (``deep``) pass through a class scope unfiltered.
    """
    inner = _Names()
    declared_global: set[str] = set()
    declared_nonlocal: set[str] = set()
    for stmt in body:
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Global):
                declared_global.update(sub.names)
            elif isinstance(sub, ast.Nonlocal):
                declared_nonlocal.update(sub.names)
        _scan(stmt, inner)
    local = (set(params) | set(inner.stores)) - declared_global
    free = [n for n in inner.loads if n not in local and n not in declared_nonlocal]
    if function:
        out.deep.extend(free)
        out.deep.extend(n for n in inner.deep if n not in local and n not in declared_nonlocal)
    else:
        out.loads.extend(free)
        out.deep.extend(inner.deep)
    out.globals.extend(n for n in inner.stores if n in declared_global)
    out.globals.extend(inner.globals)


def _ends_quiet(source: str) -> bool:
    """True if the cell's last token is ``;`` (IPython then shows no ``Out[...]``)."""
    last = ""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                                tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
                last = tok.string
    except (tokenize.TokenError, SyntaxError):
        return False
    return last == ";"


def _unique(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def analyze(source: str) -> CellAnalysis:
    """Analyse a cell's Python source; a ``SyntaxError`` propagates with the cell's line numbers."""
    tree = ast.parse(source, "<decompute cell>")
    reads: list[str] = []
    assigns: list[str] = []
    imports: list[str] = []
    import_stmts: list[str] = []
    bound: set[str] = set()
    for stmt in tree.body:
        names = _Names()
        _scan(stmt, names)
        reads.extend(n for n in [*names.loads, *names.deep] if n not in bound)
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            imports.extend(names.stores)
            import_stmts.append(ast.unparse(stmt))
        else:
            assigns.extend(names.stores)
        assigns.extend(names.globals)
        if isinstance(stmt, _DEFINITE):
            bound.update(names.stores)
    imported = set(imports)
    return CellAnalysis(
        reads=_unique(reads),
        assigns=_unique([n for n in assigns if n not in imported]),
        imports=_unique(imports),
        import_source="\n".join(import_stmts),
        has_last_expr=bool(tree.body) and isinstance(tree.body[-1], ast.Expr),
        quiet=_ends_quiet(source),
    )


def split_names(text: str | None) -> list[str] | None:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; each must be an identifier (for ``--push/--pull``)."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"not Python names: {', '.join(map(repr, bad))}")
    return names
