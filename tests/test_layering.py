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
