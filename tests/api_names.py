"""Static API checks shared by the TensorRT tests: an index of the tensorrt-stubs package (TensorRT's published Python
API) and attribute-chain scanners over a module's source. TensorRT cannot be installed on the CPU machines, so the
names our TensorRT code calls are checked against these stubs instead.
"""

import ast
import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Names the stubs (10.13) do not cover, each with the page that documents it. tensorrt-stubs has no tensorrt.plugin.
_QDP = "https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin"
NOT_IN_STUBS = {
    "tensorrt.plugin.register": f"{_QDP}/trt_plugin_register.html",
    "tensorrt.plugin.aot_impl": f"{_QDP}/trt_plugin_aot_impl/index.html",
    "tensorrt.plugin.KernelLaunchParams": f"{_QDP}/trt_plugin_aot_impl/KernelLaunchParams.html",
    # SymIntExprs(n) and SymInt32 as the extra-args container: the aot_impl page's example.
    "tensorrt.plugin.SymIntExprs": f"{_QDP}/trt_plugin_aot_impl/index.html",
    "tensorrt.plugin.TensorDesc": f"{_QDP}/Tensor/TensorDesc.html",
    # from_shape_expr((dims...), dtype): NVIDIA's QDP sample README (non_zero plugin) and tensorrt/plugin/_top_level.py.
    "tensorrt.plugin.from_shape_expr": f"{_QDP}/Functions/index.html",
}

# --------------------------------------------------------------------------------------------------- stub index

_CLASS = re.compile(r"^(\s*)class\s+(\w+)\s*(?:\((.*)\))?\s*:")
_DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+(\w+)\s*\(")
_ATTR = re.compile(r"^(\s*)(\w+)\s*[:=]")
_FROM = re.compile(r"^from\s+[\w.]+\s+import\s+(\w+)(?:\s+as\s+(\w+))?\s*$")
_IMPORT = re.compile(r"^import\s+([\w.]+)(?:\s+as\s+(\w+))?\s*$")


@dataclass
class Stubs:
    version: str
    module: set[str] = field(default_factory=set)
    classes: dict[str, set[str]] = field(default_factory=dict)
    bases: dict[str, list[str]] = field(default_factory=dict)
    plugin_module: set[str] | None = None

    def members(self, cls: str) -> set[str]:
        out = set(self.classes.get(cls, set()))
        for base in self.bases.get(cls, []):
            if base in self.classes and base != cls:
                out |= self.members(base)
        return out


def scan(text: str, stubs: Stubs, module: set[str]) -> None:
    """Classes and members of a .pyi by indentation (tensorrt.pyi does not parse as Python)."""
    stack: list[tuple[int, str]] = []  # (indent, qualified class name or "<def>")
    in_doc = False
    for line in text.splitlines():
        quotes = line.count('"""') + line.count("'''")
        if in_doc:
            in_doc = quotes % 2 == 0
            continue
        if quotes:
            in_doc = quotes % 2 == 1
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "@")):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and indent <= stack[-1][0]:
            stack.pop()
        owner = stack[-1][1] if stack else None
        if owner == "<def>":
            continue
        names = module if owner is None else stubs.classes.setdefault(owner, set())
        if m := _CLASS.match(line):
            qual = m.group(2) if owner is None else f"{owner}.{m.group(2)}"
            names.add(m.group(2))
            stubs.classes.setdefault(qual, set())
            stubs.bases[qual] = [b.strip().split(".")[-1] for b in (m.group(3) or "").split(",") if b.strip()]
            stack.append((indent, qual))
        elif m := _DEF.match(line):
            names.add(m.group(2))
            stack.append((indent, "<def>"))
        elif owner is None and (m := _FROM.match(stripped) or _IMPORT.match(stripped)):
            names.add(m.group(2) or m.group(1).split(".")[-1])
        elif m := _ATTR.match(line):
            names.add(m.group(2))
            if m.group(2) == "__all__":
                names.update(re.findall(r"'(\w+)'", line))


def load_stubs() -> Stubs:
    """The installed tensorrt-stubs, indexed (skips the calling test when they are not installed)."""
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs): the TensorRT names of "
                    "export/tensorrt_engine.py are checked against it")
    files = {str(f): Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".pyi")}
    assert "tensorrt/__init__.pyi" in files, f"unexpected tensorrt-stubs layout: {sorted(files)}"
    result = Stubs(version=dist.version)
    scan(files["tensorrt/__init__.pyi"].read_text(), result, result.module)
    throwaway: set[str] = set()
    for name, path in files.items():
        if name.startswith("tensorrt_bindings/"):
            scan(path.read_text(), result, throwaway)
        elif name.startswith("tensorrt/plugin"):
            result.plugin_module = result.plugin_module or set()
            scan(path.read_text(), result, result.plugin_module)
    assert {"Builder", "OnnxParser", "IBuilderConfig"} <= result.module, "stub scan found no TensorRT classes"
    return result


def unknown_name(stubs: Stubs, root: str, chain: list[str]) -> str | None:
    """The first name of ``root.chain`` the stubs do not have, or None (values past a non-class are not followed)."""
    full = ".".join([root, *chain])
    if root == "tensorrt.plugin":
        if stubs.plugin_module is not None:
            return None if chain[0] in stubs.plugin_module else full
        return None if f"tensorrt.plugin.{chain[0]}" in NOT_IN_STUBS else full
    head, *rest = chain
    if head not in stubs.module:
        return None if f"tensorrt.{head}" in NOT_IN_STUBS else f"tensorrt.{head}"
    cls, path = (head if head in stubs.classes else None), f"tensorrt.{head}"
    for part in rest:
        if cls is None:
            return None
        path = f"{path}.{part}"
        if part not in stubs.members(cls):
            return None if path in NOT_IN_STUBS else path
        cls = f"{cls}.{part}" if f"{cls}.{part}" in stubs.classes else None
    return None


def attribute_chains(tree: ast.AST, aliases: dict[str, str]) -> list[tuple[str, list[str], int]]:
    """Outermost attribute chains ``x.a.b`` whose root name is in ``aliases``: ``(aliases[x], [a, b], line)``."""
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                out.append((aliases[cur.id], parts[::-1], node.lineno))
    return out


def tensorrt_chains(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """Attribute chains rooted at a name bound by ``import tensorrt [as x]`` / ``import tensorrt.plugin as y``."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tensorrt":
            raise AssertionError(f"line {node.lineno}: use `import tensorrt as trt` so that the names are checked")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("tensorrt", "tensorrt.plugin"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    return attribute_chains(tree, aliases)


def name_problems(stubs: Stubs, source: str, typed_names: dict[str, str]) -> list[str]:
    """Every TensorRT name of ``source`` the stubs lack: module chains, and members read on variables whose class is
    known (``typed_names``: variable → TensorRT class), as ``"line N: Class.member (var.member)"``."""
    tree = ast.parse(source)
    problems = [f"line {line}: {bad}" for root, chain, line in tensorrt_chains(tree)
                if (bad := unknown_name(stubs, root, chain))]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in typed_names
                and node.attr not in stubs.members(typed_names[node.value.id])):
            var = node.value.id
            problems.append(f"line {node.lineno}: {typed_names[var]}.{node.attr} ({var}.{node.attr})")
    return problems
