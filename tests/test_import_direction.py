"""Which way imports go, checked on the source with ``ast``. The layers, top to bottom:

- ``vesl/demo/`` (the synthetic world, its recipes, runner and commands) may use everything below it;
- ``vesl/cli/`` (the command line: ``vesl.cli`` and its command groups, the labeling profiles) uses the product,
  never the demo;
- the product: ``pipeline/`` (reaches ``labelers`` only through ``wiring.py``; ``pipeline/engines/`` hold no
  model code), ``pretrain/`` (only ``schemas``; a library without command-line code), ``labelers/`` (no
  ``pipeline``), ``schemas/`` (the data contract: no other vesl folder). No product module imports the command
  line or the demo;
- no two modules import each other, directly or through others.

Every import counts, including those inside functions (lazy imports still tie modules together). The demo plugs
in through entry points (``pyproject.toml``), so no module outside ``vesl/demo/`` names it, not even as a string.
The leaves every folder may use: ``vesl.errors``, ``vesl.redact`` and the package root ``vesl`` (its
``__version__``); they import nothing from vesl themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"schemas": "vesl.schemas", "labelers": "vesl.labelers", "pipeline": "vesl.pipeline",
           "pretrain": "vesl.pretrain", "vesl": "vesl"}  # fmt: skip
PRODUCT = ("vesl.schemas", "vesl.labelers", "vesl.pipeline", "vesl.pretrain")
LEAVES = {"vesl", "vesl.errors", "vesl.redact"}
CLI, DEMO = "vesl.cli", "vesl.demo"
MODEL_LIBRARIES = ("torch", "torchvision", "transformers", "open_clip", "vllm", "spacy")


def _module_files() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _module_files()


def _resolve(name: str) -> str:
    """The module an import names: itself if it is one, else the longest module prefix (``pkg.attr``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path | None = None, source: str | None = None) -> set[str]:
    """Every name ``module`` imports (vesl modules resolved to files; others as written), lazy ones too."""
    tree = ast.parse(source if source is not None else (path or MODULES[module]).read_text())
    package = module if (path or MODULES.get(module, Path())).name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            out.add(_resolve(name) if name.split(".")[0] == "vesl" else name)
    return out


GRAPH = {m: {i for i in imports_of(m) if i in MODULES and i != m} for m in MODULES}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(rule, graph=GRAPH) -> list[str]:
    return sorted(f"{m} imports {i}" for m in graph for i in (imports_of(m) if graph is GRAPH else graph[m])
                  if rule(m, i))  # fmt: skip


def schemas_rule(m: str, i: str) -> bool:
    return _in(m, "vesl.schemas") and _in(i, "vesl") and not (_in(i, "vesl.schemas") or i in LEAVES)


def labelers_rule(m: str, i: str) -> bool:
    allowed = ("vesl.labelers", "vesl.schemas")
    return _in(m, "vesl.labelers") and _in(i, "vesl") and not (any(_in(i, a) for a in allowed) or i in LEAVES)


def pretrain_rule(m: str, i: str) -> bool:
    allowed = ("vesl.pretrain", "vesl.schemas")
    return _in(m, "vesl.pretrain") and _in(i, "vesl") and not (any(_in(i, a) for a in allowed) or i in LEAVES)


def pipeline_rule(m: str, i: str) -> bool:
    if not _in(m, "vesl.pipeline") or not _in(i, "vesl"):
        return False
    if _in(i, "vesl.labelers"):
        return m != "vesl.pipeline.wiring"
    return not (_in(i, "vesl.pipeline") or _in(i, "vesl.schemas") or i in LEAVES)


def engines_rule(m: str, i: str) -> bool:
    model_code = _in(i, "vesl.labelers") or _in(i, "vesl.pretrain") or i.split(".")[0] in MODEL_LIBRARIES
    return _in(m, "vesl.pipeline.engines") and model_code


def product_rule(m: str, i: str) -> bool:
    upward = _in(i, "vesl.demo") or (_in(i, "vesl") and not any(_in(i, p) for p in PRODUCT) and i not in LEAVES)
    return any(_in(m, p) for p in PRODUCT) and upward


def cli_rule(m: str, i: str) -> bool:
    return _in(m, CLI) and _in(i, DEMO)


def library_rule(m: str, i: str) -> bool:
    """The trainer is a library (as open_clip beside open_clip_train): no command-line framework in it."""
    return _in(m, "vesl.pretrain") and i.split(".")[0] in ("typer", "click")


RULES = {"schemas": schemas_rule, "labelers": labelers_rule, "pretrain": pretrain_rule,
         "pipeline": pipeline_rule, "engines": engines_rule, "product": product_rule, "cli": cli_rule,
         "library": library_rule}  # fmt: skip


@pytest.mark.parametrize("rule", sorted(RULES))
def test_imports_go_one_way(rule):
    assert _violations(RULES[rule]) == []


def test_leaves_import_no_vesl_module():
    assert {m: GRAPH[m] for m in LEAVES if GRAPH[m]} == {}


def test_every_module_sits_in_a_layer():
    """A new module at the package root is neither the command line nor a leaf: it goes into a folder."""
    layers = (*PRODUCT, CLI, DEMO)
    assert [m for m in MODULES if not any(_in(m, p) for p in layers) and m not in LEAVES] == []


def names_the_demo(source: str) -> list[str]:
    """Imports of the demo, and strings that name it as a module or a registration target ("vesl.demo...",
    "demo")."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _in(a.name, DEMO)]
        elif isinstance(node, ast.ImportFrom) and _in(node.module or "", DEMO):
            found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value.strip()
            if value == "demo" or DEMO in value:
                found.append(repr(node.value))
    return found


def test_no_module_outside_the_demo_names_it():
    """The demo plugs in through entry points, as a user's package would: the product works with it deleted."""
    named = {m: found for m, path in MODULES.items() if not _in(m, DEMO)
             if (found := names_the_demo(path.read_text())) or DEMO in path.read_text()}  # fmt: skip
    assert named == {}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_checks_catch_violations():
    """Each rule fires on an import that breaks it, a lazy one included; a loop is found."""
    lazy = "def f():\n    from vesl.pipeline.writer import write_shard\n"
    assert "vesl.pipeline.writer" in imports_of("vesl.labelers.phrases", source=lazy)
    assert labelers_rule("vesl.labelers.phrases", "vesl.pipeline.writer")
    assert schemas_rule("vesl.schemas.dataset", "vesl.pipeline.writer")
    assert not schemas_rule("vesl.schemas.dataset", "vesl.errors")
    assert pretrain_rule("vesl.pretrain.data", "vesl.labelers.boxes")
    assert pipeline_rule("vesl.pipeline.job", "vesl.labelers.captioners")
    assert not pipeline_rule("vesl.pipeline.wiring", "vesl.labelers.captioners")
    assert engines_rule("vesl.pipeline.engines.ray_engine", "vesl.labelers.prompts")
    assert engines_rule("vesl.pipeline.engines.local", "torch")
    assert product_rule("vesl.pipeline.sources", "vesl.demo.synth")
    assert product_rule("vesl.labelers.captioners", "vesl.cli.label")
    assert not product_rule("vesl.demo.runner", "vesl.pipeline.engines")
    assert cli_rule("vesl.cli.profiles", "vesl.demo")
    assert not cli_rule("vesl.demo.runner", "vesl.cli.label")
    assert library_rule("vesl.pretrain.train", "typer")
    assert names_the_demo("import importlib\nimportlib.import_module('vesl.demo.cli')\n") == ["'vesl.demo.cli'"]
    assert names_the_demo("register_source('synth://', 'vesl.demo.source:SYNTH')") == ["'vesl.demo.source:SYNTH'"]
    assert names_the_demo("def f():\n    from vesl.demo import demo_profile\n") == ["vesl.demo"]
    assert names_the_demo("if name == 'demo':\n    pass\n") == ["'demo'"]
    assert names_the_demo("raise UserError('use --profile demo')") == []  # a hint to the user names no target
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_building_the_stages_imports_no_model_library():
    """A Ray or Beam driver builds the stages only to plan the job (names, batch sizes, pools); the model
    libraries load in each worker's setup(). Importing torch, torchvision and transformers in the driver first
    cost 3-5 s before any worker started."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from vesl.pipeline.config import LabelConfig\n"
        "from vesl.pipeline.wiring import build_stages\n"
        "from vesl.schemas.config import CaptionerConfig, DetectorConfig\n"
        "for det in ('owlv2:/nowhere/owl', 'grounding-dino:/nowhere/gd'):\n"
        "    cfg = LabelConfig(inputs=['x.tar'], output='unused', captioner=CaptionerConfig(spec='hf:/nowhere/vlm'),\n"
        "                      detector=DetectorConfig(spec=det))\n"
        "    assert [s.name for s in build_stages(cfg)] == ['decode', 'caption', 'phrases', 'detect']\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'transformers', 'spacy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
