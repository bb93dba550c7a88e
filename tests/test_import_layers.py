"""Imports run downhill (DESIGN.md, "The house as built"): every import inside lora_kernels, eager or
inside a function, goes to a layer below the importing module's (or, for the kernels and the adapter
files / merging, only to the layers they are allowed), never to a layer above and never to a peer in its
own layer (the two launchers, say, share helpers through a module below both). Type-only imports (under
`if TYPE_CHECKING:`) run nothing and are not counted; imports by name (importlib) are not seen."""

import ast
import fnmatch
import pathlib
import sys

import lora_kernels

PACKAGE_DIR = pathlib.Path(lora_kernels.__file__).parent

# Lowest first; a module's layer is the first whose patterns match its dotted name (without "lora_kernels.").
# The third field: the layers it may import (None: any layer below it).
LAYERS = [
    ("leaf helpers", ["_env", "_safe_regex", "_deprecated", "_dtensor"], None),
    ("checks and spec", ["_checks", "reference"], None),
    ("extension, plan tables", ["_extension", "tuning"], None),
    ("kernel helpers", ["triton.kernels._*"], ()),                        # pure @triton.jit
    ("kernels", ["triton.kernels.*"], ("kernel helpers",)),
    ("launcher helpers", ["triton._*"], None),
    ("launchers", ["triton.lora_linear", "triton.multi_lora_linear"], None),
    ("backends", ["triton.backend", "fallback"], None),
    ("backend choice", ["_backend"], None),
    ("metadata", ["metadata"], None),
    ("op helpers", ["ops._autograd", "ops._composite", "ops._tensor_parallel"], None),
    ("op dispatch", ["ops._dispatch"], None),
    ("ops", ["ops.*"], None),
    ("single-adapter module", ["nn.lora_linear"], None),
    ("multi-adapter module", ["nn.multi_lora_linear"], None),     # shares LoRALinear's autocast handling
    ("PEFT integration", ["nn.peft"], None),
    ("tensor parallelism", ["nn.tensor_parallel"], None),         # styles for our modules and PEFT's layers
    ("package namespaces", ["nn", "triton", "triton.kernels", "ops"], None),
    ("tuner", ["tune"], None),
    # beside the modules (DESIGN): checks and the spec only, and nothing but the package imports them
    ("adapter files, merging", ["io", "merging", "adapter_io"], ("leaf helpers", "checks and spec")),
    ("package", [""], None),
]
LAYER_INDEX = {name: index for index, (name, _, _) in enumerate(LAYERS)}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    for index, (_, patterns, _) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"lora_kernels.{name} is in no layer of this test's LAYERS: add it where it belongs")


def is_module(name: str) -> bool:
    path = PACKAGE_DIR.joinpath(*name.split(".")) if name else PACKAGE_DIR
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return skipped


def imported_modules(path: pathlib.Path) -> set[str]:
    """The lora_kernels modules `path` imports (dotted, without "lora_kernels.")."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skipped = type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.split(".")[0] == "lora_kernels"]
            found |= {t.removeprefix("lora_kernels").lstrip(".") for t in targets}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "lora_kernels":
                source = node.module.removeprefix("lora_kernels").lstrip(".")
            else:
                continue
            for alias in node.names:   # `from . import io` imports the module io
                submodule = f"{source}.{alias.name}" if source else alias.name
                found.add(submodule if is_module(submodule) else source)
    found.discard(name)
    return found


def may_import(importer: str, target: str) -> bool:
    layer, allowed = layer_of(importer), LAYERS[layer_of(importer)][2]
    if allowed is None:
        return layer_of(target) < layer
    return layer_of(target) in {LAYER_INDEX[name] for name in allowed}


def test_every_module_has_a_layer_and_imports_only_below_it():
    arrows_up = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name = module_name(path)
        for target in sorted(imported_modules(path)):
            if not may_import(name, target):
                arrows_up.append(f"lora_kernels.{name} ({LAYERS[layer_of(name)][0]}) imports lora_kernels.{target} "
                                 f"({LAYERS[layer_of(target)][0]})")
    assert not arrows_up, "imports that do not run downhill:\n" + "\n".join(arrows_up)


def test_kernels_import_triton_only():
    """triton/kernels/ is pure @triton.jit code: no torch, nothing of the package but its own helpers."""
    for path in sorted((PACKAGE_DIR / "triton" / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            assert all(n.split(".")[0] in ("triton", "__future__") for n in names), f"{path.name} imports {names}"


def test_the_checker_sees_relative_lazy_and_type_only_imports(tmp_path, monkeypatch):
    """The parser above on a made-up package: a lazy import counts, a TYPE_CHECKING one does not."""
    package = tmp_path / "lora_kernels"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "metadata.py").write_text("")
    (package / "ops" / "__init__.py").write_text("")
    (package / "fallback.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import metadata as m\n"
        "if TYPE_CHECKING:\n    from .ops import x\n"
        "def f():\n    from .ops.lora_linear import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", package)
    assert imported_modules(package / "fallback.py") == {"metadata", "ops.lora_linear"}
