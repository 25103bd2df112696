"""The architecture's rules, checked on the source (docs/architecture.md)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("pimc", "passes", "runtime") for p in (ROOT / d).rglob("*.py")]


def _code(path: Path) -> str:
    """The source without comments and docstrings' prose lines that merely mention names."""
    return "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))


def test_only_the_names_module_spells_ir_names():
    names = ROOT / "pimc" / "core" / "names.py"
    spelled = re.compile(r"""["'][^"'\n]*(/pimc/|pimc_probe|pimc/chip)[^"'\n]*["']|f["'][^"'\n]*\}/pimc/""")
    offenders = []
    for p in SOURCES:
        if p == names:
            continue
        for i, ln in enumerate(_code(p).splitlines(), 1):
            if spelled.search(ln) and "``" not in ln:
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {ln.strip()}")
    assert not offenders, "IR tensor/node names built outside pimc/core/names.py:\n" + "\n".join(offenders)


def test_the_op_domain_is_spelled_once():
    offenders = [f"{p.relative_to(ROOT)}" for p in SOURCES if p.name != "names.py" and '"ai.pimc"' in _code(p)]
    assert not offenders, offenders


# ---- import direction -------------------------------------------------------------
import ast  # noqa: E402

# the layers, bottom up (docs/architecture.md); a module may import its own layer and those below
LAYERS = [
    ("core", {"pimc.core"}),
    ("base", {"pimc.io"}),
    ("runtime", {"pimc.runtime"}),
    ("compiler", {"pimc.lowering", "pimc.model", "pimc.calibration", "pimc.pipeline", "pimc.summary",
                  "pimc.passes"}),
    ("top", {"pimc.cli", "pimc.evaluate", "pimc.sweep", "pimc.compare", "pimc.htmlreport", "pimc.executor",
             "pimc.layerstats", "pimc.bncal", "pimc.demo", "pimc.datasets", "pimc"}),
]


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = {"pimc": "pimc", "passes": "pimc.passes", "runtime": "pimc.runtime"}[parts[0]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    return level


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pimc")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("pimc"):
                out.add(name)
                if name == "pimc":   # "from pimc import passes": the submodules named (the version is a constant)
                    out |= {f"pimc.{a.name}" for a in node.names if not a.name.startswith("__")}
    return out


def test_imports_point_down_the_layers():
    wrong = []
    for p in SOURCES:
        mod = _module_of(p)
        mine = _layer(mod)
        assert mine is not None, f"{mod} belongs to no layer: add it to LAYERS and docs/architecture.md"
        for imp in _imports(p, mod):
            theirs = _layer(imp)
            if imp == "pimc" or theirs is None:   # the package itself: only its version is read below the top
                continue
            if theirs > mine:
                wrong.append(f"{mod} ({LAYERS[mine][0]}) imports {imp} ({LAYERS[theirs][0]})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_core_imports_nothing_else_of_pimc():
    have = {p.stem for p in (ROOT / "pimc" / "core").glob("*.py")}
    assert {"mapping", "formulas", "planning", "names", "chip", "config", "errors"} <= have, have
    for p in (ROOT / "pimc" / "core").rglob("*.py"):
        for imp in _imports(p, _module_of(p)):
            assert imp.startswith("pimc.core"), f"{p.name} imports {imp}"


def test_compiled_mappings_are_read_only_through_the_typed_mapping():
    """Outside pimc/core/mapping.py nobody parses the metadata record or digs in it by key; the
    writers (the compiler's model, BN calibration rewriting its record) write whole records."""
    reading = re.compile(r"""json\.loads\([^)]*pimc\.mapping|mapping\[["']layers["']\]|\bL\[["']|L\.get\(""")
    offenders = []
    for p in SOURCES:
        if p.relative_to(ROOT).as_posix() == "pimc/core/mapping.py":
            continue
        for i, ln in enumerate(_code(p).splitlines(), 1):
            if reading.search(ln):
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {ln.strip()}")
    assert not offenders, "\n".join(offenders)


def test_every_session_is_opened_by_open_session():
    """One session opener (runtime/session.py): calibration and the batch check included."""
    opener = ROOT / "runtime" / "session.py"
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p != opener
                 for i, ln in enumerate(_code(p).splitlines(), 1) if "InferenceSession(" in ln]
    assert not offenders, offenders
