"""Mutation check of the core: can the fast unit tests tell a broken estimator, generator, defence or aggregation?

A small AST mutator flips one operator or constant at a time (``+``/``-``, ``*``/``/``, ``<<``/``>>``, ``&``/``|``,
``^``, comparisons, ``and``/``or``, unary ``-``/``not``, an integer n -> n + 1, a float x -> 2x) in a temporary copy of
the package, and runs the unit tests that cover that module against it, in a process forked from one that has
already imported torch, Flower and pytest (a mutant takes seconds). A mutant is *killed* when a test fails (or the
run errors or hangs), and *survives* when every test passes. Error messages, log calls, docstrings and annotations
are not mutated. Surviving mutants that cannot be told apart by any test (equivalent mutants) are listed in
``EQUIVALENT`` with the reason.

    python benchmarks/mutation.py                 # all targets; writes runs/mutation.json and prints the table
    python benchmarks/mutation.py --only rng      # the targets whose path contains "rng"
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module -> (functions to mutate, or None for the whole module; the fast tests that cover it)
RNG_TESTS = [
    "tests/test_rng.py",
    "tests/test_fleet.py::test_docs_devices_pseudocode_reproduces_the_generator",
    "tests/test_protocol.py",
]
RULE_TESTS = ["tests/test_reliability.py", "tests/test_aggregation.py"]
TARGETS: dict[str, tuple[set[str] | None, list[str]]] = {
    "fedprge/engine/rng.py": (None, RNG_TESTS),
    "fedprge/engine/estimator.py": (
        None,
        [
            "tests/test_protocol.py",
            "tests/test_personalization.py::test_clip_rms_bounds_the_step_and_leaves_small_gradients_alone",
            "tests/test_estimator.py",
        ],
    ),
    "fedprge/federation/defences.py": (None, RULE_TESTS),
    "fedprge/federation/protocol.py": ({"apply_coefficients"}, ["tests/test_protocol.py", *RULE_TESTS]),
    "fedprge/federation/aggregation.py": ({"combine"}, RULE_TESTS),
}
# runs whole test files but never what needs other processes or minutes; the cross-process test would compare the
# mutant with the installed, unmutated package and "kill" every generator mutant for the wrong reason
DESELECT = ["tests/test_rng.py::test_directions_bit_identical_across_processes"]

# (module, function, line, mutation) -> why no test can tell the mutant from the original
CHUNKS = "the chunk length of the generator loop: the same values, drawn in other pieces"
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("rng.py", "_CHUNK_ELEMENTS", "17 -> 18"): CHUNKS,
    ("rng.py", "_CHUNK_ELEMENTS", "<< -> >>"): CHUNKS + " (1 >> 17 = 0: every chunk is the 1,024 minimum)",
    ("rng.py", "_CHUNK_ELEMENTS", "1 -> 2"): CHUNKS,
    ("rng.py", "directions", "1024 -> 1025"): CHUNKS,
    ("rng.py", "directions", "// -> *"): CHUNKS,
    ("rng.py", "directions", "1 -> 2"): CHUNKS + " (max(1, len(seeds)) guards a division for zero seeds)",
    ("rng.py", "directions", "drop unary not"): "list(seeds) or seeds: torch.as_tensor reads both the same",
    ("defences.py", "check_reply", "0.0 -> 1.0"): "the peak of an empty reply: decode_grads never returns one",
    ("estimator.py", "clip_rms", "> -> >="): "at rms == clip the factor is clip / rms = 1: the same g",
    ("estimator.py", "clip_rms", "1.0 -> 2.0"): "clamp(clip / rms, max=1) runs only when rms > clip: never above 1",
    ("aggregation.py", "combine", "0 -> 1"): "k is read only by trimmed_mean; clients[0] or [1]: the same shared seeds",
    ("aggregation.py", "combine", "and -> or"): "trimming k = 0 clients trims none (and k is 0 unless trimmed_mean)",
}

SWAP_BIN = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.BitXor: ast.BitOr,
}
SWAP_CMP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
SYMBOL = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.And: "and",
    ast.Or: "or",
}


@dataclass
class Mutant:
    module: str
    function: str
    line: int
    mutation: str
    killed: bool | None = None
    seconds: float = 0.0
    reason: str = ""


def _skipped(node: ast.AST) -> bool:
    """Parts of a module whose mutation is not a behaviour: messages, logs, docstrings, annotations."""
    if isinstance(node, ast.Raise | ast.JoinedStr):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return isinstance(node.func.value, ast.Name) and node.func.value.id == "log"
    return False


def sites(tree: ast.Module, functions: set[str] | None) -> list[tuple[ast.AST, str, str]]:
    """Every mutable node as (node, enclosing function or module-level name, description)."""
    out: list[tuple[ast.AST, str, str]] = []

    def visit(node: ast.AST, where: str, active: bool) -> None:
        if _skipped(node):
            return
        if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            where = node.name
            active = functions is None or node.name in functions or active
            for child in node.body:
                # a dataclass's field defaults (ZOConfig's q, eps, lr): every caller sets them from the run config
                if not (isinstance(node, ast.ClassDef) and isinstance(child, ast.AnnAssign)):
                    visit(child, where, active)
            return
        if isinstance(node, ast.Assign | ast.AnnAssign) and where == "<module>":
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            label = target.id if isinstance(target, ast.Name) else where
            if node.value is not None:
                visit(node.value, label, active)
            return
        if isinstance(node, ast.arg | ast.arguments):
            return
        if active:
            if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in SWAP_BIN:
                new = SWAP_BIN[type(node.op)]
                out.append((node, where, f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}"))
            elif isinstance(node, ast.Compare):
                for i, op in enumerate(node.ops):
                    if type(op) in SWAP_CMP:
                        out.append(((node, i), where, f"{SYMBOL[type(op)]} -> {SYMBOL[SWAP_CMP[type(op)]]}"))
            elif isinstance(node, ast.BoolOp):
                new = ast.Or if isinstance(node.op, ast.And) else ast.And
                out.append((node, where, f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}"))
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.Not):
                out.append((node, where, "drop unary " + ("-" if isinstance(node.op, ast.USub) else "not")))
            elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
                v = node.value
                out.append((node, where, f"{v} -> {v + 1 if isinstance(v, int) else (2 * v if v else 1.0)}"))
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns", "decorator_list"):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child, where, active)

    for stmt in tree.body:
        visit(stmt, "<module>", functions is None)
    return out


def mutate(source: str, index: int, functions: set[str] | None) -> tuple[str, str, int, str]:
    """The source with mutation number ``index`` applied: (source, function, line, description)."""
    tree = ast.parse(source)
    node, where, what = sites(tree, functions)[index]
    if isinstance(node, tuple):
        cmp, i = node
        cmp.ops[i] = SWAP_CMP[type(cmp.ops[i])]()
        line = cmp.lineno
    else:
        line = node.lineno
        if isinstance(node, ast.BinOp | ast.AugAssign):
            node.op = SWAP_BIN[type(node.op)]()
        elif isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):  # `not x` -> `+bool(x)`: the same truth value as `x`
                node.operand = ast.Call(ast.Name("bool", ast.Load()), [node.operand], [])
            node.op = ast.UAdd()
        else:
            v = node.value
            node.value = v + 1 if isinstance(v, int) else (2 * v if v else 1.0)
    return ast.unparse(ast.fix_missing_locations(tree)), where, line, what


def run_tests(copy_dir: Path, tests: list[str], timeout_s: float) -> tuple[bool, float]:
    """(killed, seconds): the tests, in a forked child that imports the package from ``copy_dir``."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            sys.path.insert(0, str(copy_dir))
            sys.dont_write_bytecode = True
            os.chdir(REPO)
            signal.alarm(int(timeout_s))
            import pytest

            args = [*tests, "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
            args += [a for d in DESELECT for a in ("--deselect", d)]
            os._exit(int(pytest.main(args)))
        except BaseException:  # noqa: BLE001 - any failure of the child is a killed mutant
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) != 0, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="mutate only the targets whose path contains this")
    p.add_argument("--out", default=str(REPO / "runs" / "mutation.json"))
    p.add_argument("--timeout", type=float, default=120, help="seconds per mutant (a hang counts as killed)")
    p.add_argument("--again", help="a previous report: rerun only its surviving mutants, keep its killed ones")
    a = p.parse_args(argv)
    before = {}
    if a.again:
        before = {(m["module"], m["line"], m["mutation"]): m for m in json.loads(Path(a.again).read_text())["mutants"]}

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # import the heavy dependencies once; every mutant's process is forked from here (fedprge itself is not imported)
    import flwr.app  # noqa: F401
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fedprge-mutation-"))
    shutil.copytree(REPO / "fedprge", work / "fedprge", ignore=shutil.ignore_patterns("__pycache__"))
    results: list[Mutant] = []
    try:
        targets = {k: v for k, v in TARGETS.items() if a.only in k}
        for path, (functions, tests) in targets.items():
            killed, secs = run_tests(work, tests, a.timeout)
            if killed:
                raise SystemExit(f"the tests fail on the unmutated {path}; fix them first")
            print(f"{path}: unmutated tests pass in {secs:.0f} s", flush=True)
            source = (REPO / path).read_text()
            target = work / path
            n = len(sites(ast.parse(source), functions))
            for i in range(n):
                mutated, where, line, what = mutate(source, i, functions)
                target.write_text(mutated)
                m = Mutant(Path(path).name, where, line, what)
                m.reason = EQUIVALENT.get((m.module, m.function, m.mutation), "")
                old = before.get((m.module, m.line, m.mutation))
                if old is not None and old["killed"]:
                    m.killed, m.seconds = True, old["seconds"]
                else:
                    m.killed, m.seconds = run_tests(work, tests, a.timeout)
                results.append(m)
                state = "killed" if m.killed else ("equivalent" if m.reason else "SURVIVED")
                print(f"  [{i + 1}/{n}] {m.module}:{line} {where}: {what}: {state} ({m.seconds:.0f} s)", flush=True)
            target.write_text(source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, Path(a.out))
    return 0


def report(results: list[Mutant], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mutation check of the core")
    for col in ("module", "mutants", "killed", "equivalent", "survived", "score"):
        table.add_column(col, justify="left" if col == "module" else "right")
    summary = {}
    for module in [*sorted({m.module for m in results}), "all"]:
        ms = [m for m in results if module in ("all", m.module)]
        killed = sum(bool(m.killed) for m in ms)
        equivalent = sum(not m.killed and bool(m.reason) for m in ms)
        survived = len(ms) - killed - equivalent
        score = killed / max(1, len(ms) - equivalent)
        summary[module] = {"mutants": len(ms), "killed": killed, "equivalent": equivalent, "score": score}
        table.add_row(module, str(len(ms)), str(killed), str(equivalent), str(survived), f"{100 * score:.1f}%")
    console = Console(width=120)
    console.print(table)
    for m in results:
        if not m.killed:
            print(
                f"{'equivalent' if m.reason else 'SURVIVED'}: {m.module}:{m.line} {m.function}: {m.mutation}"
                + (f"  ({m.reason})" if m.reason else "")
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "mutants": [asdict(m) for m in results]}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    sys.exit(main())
