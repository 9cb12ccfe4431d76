"""The structure docs/architecture.md describes, held against the code.

These read the package's source (imports and definitions), so a change that
breaks the layering fails here rather than in a review.
"""
import ast
import itertools
import pathlib

import numpy as np
import pytest

import fastadam
from fastadam import _formats, _reference, _step

PACKAGE = pathlib.Path(fastadam.__file__).parent


def production_modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "_reference.py")


def imports_of(tree):
    """(function name or None, imported module name) for every import in a module."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((inner, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = "." * child.level + (child.module or "")
                found.append((inner, module))
                found.extend((inner, f"{module}.{alias.name}") for alias in child.names)
            visit(child, inner)

    visit(tree, None)
    return found


def test_the_oracle_is_imported_only_as_the_numpy_backend():
    users = []
    for path in production_modules():
        for function, module in imports_of(ast.parse(path.read_text())):
            if module.split(".")[-1] == "_reference":
                users.append((path.relative_to(PACKAGE).as_posix(), function))
    assert users == [("_backends.py", "_make_numpy")]


def test_the_oracle_defines_no_format_of_its_own():
    """What code and oracle share is defined in _formats/_step; the oracle only re-exports it."""
    defined = {node.name for node in ast.parse(pathlib.Path(_reference.__file__).read_text()).body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert defined == {"adam_update", "adam_update_bf16", "adam_update_int8", "_update",
                       "adam_update_torch_order", "adam_update_mastered"}
    for name in ("bf16_round_nearest", "int8_encode", "FlushToZero", "rounding_key"):
        assert getattr(_reference, name) is getattr(_formats, name)
    for name in ("StepScalars", "step_scalars", "grad_norm", "clip_coefficient"):
        assert getattr(_reference, name) is getattr(_step, name)


def test_option_bits_pack_and_unpack():
    """Every weight-decay mode with every combination of _step.FLAGS (today's and any new
    one) packs into its own code and unpacks to itself."""
    combinations = list(itertools.product((False, True), repeat=len(_step.FLAGS)))
    for wd in (_step.WD_NONE, _step.WD_L2, _step.WD_DECOUPLED):
        for flags in combinations:
            code = _step.variant(wd, *flags)
            assert _step.variant_options(code) == (wd, *flags)
    codes = {_step.variant(wd, *flags) for wd in range(3) for flags in combinations}
    assert len(codes) == 3 * 2 ** len(_step.FLAGS) >= 12


def test_a_kernel_built_with_other_definitions_is_refused():
    import types

    from fastadam import _backends
    kernel = _backends.compiled_or_none()
    if kernel is None:
        pytest.skip("the compiled extension is not built")
    names = ("STEP_SCALAR_NAMES", "VARIANT_BITS", "MAX_STEP", "INT8_FORMAT", "INT8_MAX_UPDATE")
    built = {name: getattr(kernel, name) for name in names}
    _backends._check_built_with(types.SimpleNamespace(**built))
    changed = dict(built, STEP_SCALAR_NAMES=built["STEP_SCALAR_NAMES"][::-1])
    with pytest.raises(ImportError, match="STEP_SCALAR_NAMES"):
        _backends._check_built_with(types.SimpleNamespace(**changed))
    changed = dict(built, VARIANT_BITS=(3, 8, 4))
    with pytest.raises(ImportError, match="VARIANT_BITS"):
        _backends._check_built_with(types.SimpleNamespace(**changed))


def test_every_dtype_the_kernel_names_is_a_parameter_dtype_the_rules_accept():
    """The compiled plan finds dtypes by the names of src/fa_step.hpp's FA_DTYPES row list
    (through _formats.numpy_dtype); each must be a dtype the rules take as a parameter's,
    updated as the plan expects (low precision exactly where it is narrower than float32)."""
    from fastadam import _backends, _rules
    kernel = _backends.compiled_or_none()
    if kernel is None:
        pytest.skip("the compiled extension is not built")
    pytest.importorskip("ml_dtypes")
    _formats.bfloat16()  # imports ml_dtypes: every name then has its NumPy type
    assert len(set(kernel.DTYPE_NAMES)) == len(kernel.DTYPE_NAMES) >= 4
    for name in kernel.DTYPE_NAMES:
        dtype = _formats.numpy_dtype(name)
        assert dtype is not None and dtype.name == name
        _rules.parameter(np.zeros(4, dtype), "p")
        assert _formats.is_low_precision(dtype) == (dtype.itemsize < 4)
        opt = fastadam.Adam([np.zeros(4, dtype)], backend="cython")
        opt.step([np.ones(4, dtype)])


def test_variants_are_one_default_apart():
    import inspect

    import fastadam.distributed as distributed

    pairs = [(fastadam.Adam, fastadam.AdamW), (distributed.ZeroAdam, distributed.ZeroAdamW)]
    for base, variant in pairs:
        a, b = inspect.signature(base), inspect.signature(variant)
        assert [p.name for p in a.parameters.values()] == [p.name for p in b.parameters.values()]
        assert a.parameters["weight_decay"].default == 0.0
        assert b.parameters["weight_decay"].default == 1e-2
        for name, p in a.parameters.items():
            if name != "weight_decay":
                assert b.parameters[name] == p
    with pytest.raises(TypeError, match="unexpected keyword"):
        fastadam.AdamW([], weight_decy=0.1)


SOURCE = PACKAGE.parent / "src"


def source_files():
    """The package's and the extension's sources as written (not Cython's output)."""
    files = list(PACKAGE.rglob("*.py"))
    if SOURCE.is_dir():  # an installed wheel has no src/
        files += [p for p in SOURCE.iterdir() if p.suffix in (".pyx", ".pxi", ".hpp", ".h")]
    return files


def test_no_source_file_over_500_lines():
    long = {p.name: n for p in source_files() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_the_scalar_list_is_written_in_one_place_per_language():
    """The ten names in order appear only in their record: StepScalars (Python) and
    FA_STEP_SCALARS (C++); everyone else reads fields by name."""
    import re

    names = list(_step.StepScalars._fields)

    def lists_them(text):  # the ten as a run of the file's own uses of them, comments aside
        code = "\n".join(re.split(r"#|//", line)[0] for line in text.splitlines())
        used = [w for w in re.findall(r"[A-Za-z_]\w*", code) if w in names]
        return any(used[i:i + len(names)] == names for i in range(len(used)))

    holders = sorted(p.name for p in source_files() if lists_them(p.read_text()))
    assert holders == (["_step.py", "fa_step.hpp"] if SOURCE.is_dir() else ["_step.py"])


def test_a_flag_without_state_is_named_as_a_group_key_only_in_the_flag_table():
    """The rules, the compiled plan, the Python checks and fastadam.torch read a group's
    option flags through _step.FLAGS, so a new flag needs none of them changed
    (docs/architecture.md). AMSGrad has state of its own, which is read by name."""
    import re

    from fastadam import _rules
    assert _rules.HYPERPARAMETERS[-len(_step.FLAGS):] == _step.FLAGS
    stateless = [name for name in _step.FLAGS if name != "amsgrad"]
    assert stateless  # maximize, at least
    named = sorted({p.name for p in source_files() if p.suffix in (".py", ".pyx", ".pxi")
                    for name in stateless if re.search(rf"[\"']{name}[\"']", p.read_text())})
    assert named == ["_step.py"]


def test_the_roofline_is_a_benchmark_not_part_of_the_extension():
    """The speed report's roofline row is built from benchmarks/roofline.c of a checkout;
    the installed extension carries no benchmark code."""
    from fastadam import _backends, bench
    kernel = _backends.compiled_or_none()
    if kernel is not None:
        assert [name for name in dir(kernel) if "roofline" in name.lower()] == []
    try:
        step = bench._roofline(1 << 16, 2)  # over the parallel threshold: two threads
    except bench.Unavailable as e:
        pytest.skip(str(e))
    p, g, m, v = step.arrays
    p0 = p.copy()
    step()
    assert np.array_equal(p, p0 + g) and np.array_equal(m, g) and np.array_equal(v, g)


def asserts_something(node, helpers, seen=()):
    """Whether a function asserts: an assert statement, raise AssertionError, pytest.raises,
    warns or fail, an assert_* call (np.testing's, torch.testing's), or a call of a helper
    of the same module that does."""
    for n in ast.walk(node):
        if isinstance(n, ast.Assert):
            return True
        if isinstance(n, ast.Raise) and n.exc is not None and "AssertionError" in ast.unparse(n.exc):
            return True
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name.startswith("assert") or name in ("raises", "warns", "fail"):
                return True
            if name in helpers and name not in seen and asserts_something(helpers[name], helpers, seen + (name,)):
                return True
    return False


def test_every_test_asserts_something():
    """A test that asserts nothing cannot fail: each test function of tests/ (and the
    benchmarks' pytest cases do not count) asserts, itself or through a helper."""
    silent = []
    for path in sorted(pathlib.Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        helpers = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        silent += [f"{path.name}::{n.name}" for n in tree.body
                   if isinstance(n, ast.FunctionDef) and n.name.startswith("test")
                   and not asserts_something(n, helpers)]
    assert len(silent) == 0, f"tests that assert nothing: {silent}"
    assert asserts_something(ast.parse("def t():\n    x = 1\n    assert x"), {})  # the check itself
    assert not asserts_something(ast.parse("def t():\n    print(1)"), {})
