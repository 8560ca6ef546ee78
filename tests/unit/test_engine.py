"""Engine stage without TensorRT: API conformance to the published 10.16 / 11.4 surfaces, commands, honest absence.

TensorRT cannot run here, so its API is checked statically: every `trt.` name in trtglm/engine/*.py must exist in
each TensorRT version whose path runs it (both, unless inside an `if hasattr(trt.X, "Y")` feature check).
"""

from __future__ import annotations

import ast
import ctypes.util
import importlib.util
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from trtglm.config import ShapeProfile
from trtglm.engine import build_engine, sidecar_path, tensorrt_status
from trtglm.gpu import gpu_problem
from trtglm.engine.commands import polygraphy_command, trtexec_command
from trtglm.errors import ConfigError, ModelError, TrtglmError

ROOT = Path(__file__).resolve().parents[2]
SURFACES = ROOT / "tests" / "data" / "tensorrt"  # copies of ../shared/tensorrt (see its README)
ENGINE_SOURCES = sorted((ROOT / "trtglm" / "engine").glob("*.py"))
MODULE_DUNDERS = {"__version__"}  # the dumps list a module's constants, functions, enums and classes, no dunders


# ---- the conformance checker --------------------------------------------------------------------------------

@dataclass
class Surface:
    """The `tensorrt` module of one version: top-level names, and members of each class/enum."""

    version: str
    names: set[str] = field(default_factory=set)
    members: dict[str, set[str]] = field(default_factory=dict)
    returns: dict[tuple[str, str], str] = field(default_factory=dict)  # (class, method/property) -> class name
    bases: dict[str, list[str]] = field(default_factory=dict)
    enums: set[str] = field(default_factory=set)
    deprecated: set[tuple[str, str]] = field(default_factory=set)
    signatures: dict[tuple[str, str], list[tuple[list[str], int]]] = field(default_factory=dict)  # (names, required)

    def has(self, owner: str | None, name: str) -> bool:
        if owner is None:
            return name in self.names or name in MODULE_DUNDERS
        return any(name in self.members.get(c, ()) for c in self._mro(owner))

    def returned(self, owner: str, name: str) -> str | None:
        for c in self._mro(owner):
            if (c, name) in self.returns:
                return self.returns[c, name]
        return None

    def is_deprecated(self, owner: str | None, name: str) -> bool:
        return any((c, name) in self.deprecated for c in self._mro(owner)) if owner else False

    def accepts(self, owner: str, name: str, positional: int, keywords: list[str]) -> bool:
        """Whether some overload of owner.name takes this many positional arguments and these keywords; True when
        the surface gives no signature (pybind's `(*args, **kwargs)` dispatcher or `(...)`)."""
        overloads = next((self.signatures[c, name] for c in self._mro(owner) if (c, name) in self.signatures), None)
        if overloads is None:
            return True
        return any(positional <= len(params) and all(k in params[positional:] for k in keywords)
                   and positional + sum(p in keywords for p in params[positional:required]) >= required
                   for params, required in overloads)

    def is_class(self, name: str) -> bool:
        return name in self.members and name not in self.enums

    def _mro(self, owner: str) -> list[str]:
        order = [owner]
        for c in order:
            order += [b for b in self.bases.get(c, ()) if b not in order]
        return order


def load_surface(path: Path) -> Surface:
    lines = path.read_text().splitlines()
    surface = Surface(re.search(r"tensorrt (\S+)", lines[0]).group(1))
    section, owner = None, None
    for line in lines[1:]:
        if line.startswith("## "):
            section = line[3:].split()[0]
            if section == "tensorrt.plugin":  # a separate module (tensorrt.plugin), not attributes of tensorrt
                break
            continue
        if section in ("constants", "functions") and line and not line.startswith("#"):
            surface.names.add(re.match(r"\w+", line).group())
        elif m := re.fullmatch(r"(class|enum) (\w+)(?:\((.*)\))?", line):
            owner = m.group(2)
            surface.names.add(owner)
            surface.members.setdefault(owner, set())
            surface.bases[owner] = [b.strip() for b in (m.group(3) or "").split(",") if b.strip()]
            if m.group(1) == "enum":
                surface.enums.add(owner)
        elif owner and (m := re.match(r"  (?:(method|property|attr) )?(\w+)(.*)", line)):
            kind, name, rest = m.groups()
            surface.members[owner].add(name)
            if rest.rstrip().endswith("DEPRECATED"):
                surface.deprecated.add((owner, name))
            typed = re.search(r"-> ([\w:]+)", rest) if kind == "method" else re.match(r": ([\w:]+)", rest)
            params = _params(rest) if kind == "method" else None
            if params is not None:
                surface.signatures.setdefault((owner, name), []).append(params)
            if kind in ("method", "property") and typed and (owner, name) not in surface.returns:
                surface.returns[owner, name] = typed.group(1).split("::")[-1]
    # return types such as nvonnxparser::IParserError name the C++ interface; Python's class drops the I
    surface.returns = {k: (v if v in surface.members else v[1:]) for k, v in surface.returns.items()}
    return surface


def _params(rest: str) -> tuple[list[str], int] | None:
    """'(self: X, a: T, b: T = 1) -> R' -> (['a', 'b'], 1 required); None for '(*args, **kwargs)' and '(...)'."""
    if not rest.startswith("(self: "):
        return None
    depth, parts, current = 0, [], ""
    for ch in rest[1:]:
        if ch == ")" and depth == 0:
            parts.append(current)
            break
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (ch in "([<") - (ch in ")]>")
        current += ch
    params = [p.strip() for p in parts[1:] if p.strip()]
    return [p.split(":")[0].strip() for p in params], sum("=" not in p for p in params)


def conformance_problems(sources: dict[str, str], surfaces: list[Surface]) -> list[str]:
    """Every tensorrt name the sources use, missing from a surface whose code path uses it (one line each).

    Tracked: `trt.Name`, `trt.Class.member` / `trt.Enum.MEMBER`, and members used on objects whose class is
    known from a constructor (`x = trt.Builder(...)`), from the surface's return type of a method or property
    (`config = builder.create_builder_config()`), or from a `trt.Class` parameter annotation. Paths: code under
    `if hasattr(trt.X, "Y")` runs only on the versions where X has Y (its else branch on the others).
    """
    problems = []
    for filename, text in sources.items():
        _Checker(filename, surfaces, problems).visit(ast.parse(text))
    return problems


def deprecated_uses(sources: dict[str, str], surfaces: list[Surface]) -> dict[str, list[str]]:
    """Per version, the names the sources use on that version's path that its surface marks DEPRECATED."""
    found: dict[str, list[str]] = {s.version: [] for s in surfaces}
    for filename, text in sources.items():
        checker = _Checker(filename, surfaces, [])
        checker.visit(ast.parse(text))
        for version, what in checker.deprecated:
            found[version].append(what)
    return found


def _chain(node: ast.AST) -> list[str] | None:
    """trt.A.B -> ['A', 'B'] (only attribute chains rooted at the name `trt`)."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return names[::-1] if isinstance(node, ast.Name) and node.id == "trt" and names else None


class _Checker(ast.NodeVisitor):
    def __init__(self, filename: str, surfaces: list[Surface], problems: list[str]):
        self.filename, self.surfaces, self.problems = filename, surfaces, problems
        self.active = list(surfaces)  # the versions on whose path the current code runs
        self.types: dict[str, str] = {}  # local name -> tensorrt class, in the current function
        self.attrs: dict[str, str] = {}  # self.<name> -> tensorrt class, in the current class
        self.deprecated: list[tuple[str, str]] = []  # (version, name) used on that version's path, deprecated there

    def report(self, node: ast.AST, what: str, missing: list[Surface]) -> None:
        versions = ", ".join(s.version for s in missing)
        self.problems.append(f"{self.filename}:{node.lineno}: {what} is not in TensorRT {versions}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "tensorrt" and (alias.name, alias.asname) != ("tensorrt", "trt"):
                self.problems.append(f"{self.filename}:{node.lineno}: import tensorrt only as `import tensorrt as "
                                     f"trt` (the checker follows that name)")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] == "tensorrt":
            self.problems.append(f"{self.filename}:{node.lineno}: `from tensorrt import ...` hides names from "
                                 f"the checker; use trt.Name")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer = self.attrs
        self.attrs = {}
        self.generic_visit(node)
        self.attrs = outer

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer = self.types
        self.types = {}
        for arg in node.args.args + node.args.kwonlyargs:
            chain = _chain(arg.annotation) if arg.annotation else None
            if chain and len(chain) == 1:
                self.types[arg.arg] = chain[0]
        self.generic_visit(node)
        self.types = outer

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        cls = self.type_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if cls:
                    self.types[target.id] = cls
                else:
                    self.types.pop(target.id, None)
            elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                if cls:
                    self.attrs[target.attr] = cls
                else:
                    self.attrs.pop(target.attr, None)

    def visit_If(self, node: ast.If) -> None:
        self.branch(node, node.body, node.orelse)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self.branch(node, [node.body], [node.orelse])

    def branch(self, node: ast.If | ast.IfExp, body: list[ast.AST], orelse: list[ast.AST]) -> None:
        self.visit(node.test)
        guard = self.guard(node.test)
        outer = self.active
        for nodes, keep in ((body, True), (orelse, False)):
            self.active = [s for s in outer if guard is None or guard(s) == keep]
            if guard is not None and nodes and not self.active:
                self.problems.append(f"{self.filename}:{node.lineno}: this branch runs on no claimed TensorRT "
                                     f"version ({ast.unparse(node.test)} is always {not keep})")
            for child in nodes:
                self.visit(child)
        self.active = outer

    def guard(self, test: ast.AST):
        """hasattr(trt[.Owner], "name") -> a predicate on surfaces; anything else -> None (both paths run)."""
        if not (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "hasattr"
                and len(test.args) == 2 and isinstance(test.args[1], ast.Constant)):
            return None
        target, name = test.args[0], test.args[1].value
        if isinstance(target, ast.Name) and target.id == "trt":
            return lambda s: s.has(None, name)
        chain = _chain(target)
        if chain and len(chain) == 1:
            return lambda s: s.has(chain[0], name)
        return None

    def visit_Call(self, node: ast.Call) -> None:
        self.check_arguments(node)
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr") and node.args and (
                _chain(node.args[0]) or (isinstance(node.args[0], ast.Name) and node.args[0].id == "trt")):
            self.problems.append(f"{self.filename}:{node.lineno}: {node.func.id} on a tensorrt object hides the "
                                 f"name from the checker; use hasattr() as a guard and a plain attribute")
        self.generic_visit(node)

    def check_arguments(self, node: ast.Call) -> None:
        """Argument count and keyword names of trt.Class(...) and of methods called on objects of known class."""
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return
        chain = _chain(node.func)
        if chain is not None:
            owner, name = (chain[0], "__init__") if len(chain) == 1 else (None, None)
        elif isinstance(node.func, ast.Attribute):
            owner, name = self.type_of(node.func.value), node.func.attr
        else:
            return
        if owner is None:
            return
        keywords = [k.arg for k in node.keywords]
        wrong = [s for s in self.active if s.has(owner, name) and not s.accepts(owner, name, len(node.args), keywords)]
        if wrong:
            self.report(node, f"{owner}.{name} with {len(node.args)} positional argument(s) and keywords "
                              f"{keywords}", wrong)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        chain = _chain(node)
        if chain is not None:
            if len(chain) > 2:
                return  # trt.A.B.C: A and B are checked on the inner nodes
            owner = chain[0] if len(chain) == 2 else None
            what = f"trt.{'.'.join(chain)}"
        else:
            owner = self.type_of(node.value)
            if owner is None:
                return
            what = f"{owner}.{node.attr} (on {ast.unparse(node.value)})"
        missing = [s for s in self.active if not s.has(owner, node.attr)]
        if missing:
            self.report(node, what, missing)
        self.deprecated += [(s.version, what) for s in self.active if s.is_deprecated(owner, node.attr)]

    def type_of(self, node: ast.AST) -> str | None:
        """The tensorrt class of an expression, where the sources and the surfaces tell it; else None."""
        if isinstance(node, ast.Name):
            return self.types.get(node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return self.attrs.get(node.attr)  # self.context = engine.create_execution_context() in __init__
        if isinstance(node, ast.Call):
            chain = _chain(node.func)
            if chain and len(chain) == 1:  # trt.Builder(...)
                return chain[0] if all(s.is_class(chain[0]) for s in self.active) else None
            node = node.func  # obj.method(...): the method's return type
        if isinstance(node, ast.Attribute):
            owner = self.type_of(node.value)
            if owner is None:
                return None
            kinds = {s.returned(owner, node.attr) for s in self.active}
            cls = kinds.pop() if len(kinds) == 1 else None
            return cls if cls and all(s.is_class(cls) for s in self.active) else None
        return None


@pytest.fixture(scope="module")
def surfaces():
    assert SURFACES.is_dir(), f"{SURFACES}: the TensorRT API surface files (see the engine issue) are missing"
    return [load_surface(SURFACES / "trt11-api-surface.txt"), load_surface(SURFACES / "trt10-api-surface.txt")]


def _engine_sources():
    return {p.name: p.read_text() for p in ENGINE_SOURCES}


def test_surfaces_parse(surfaces):
    trt11, trt10 = surfaces
    assert (trt11.version, trt10.version) == ("11.4.0.106", "10.16.1.11")
    assert trt10.has("BuilderFlag", "INT8") and not trt11.has("BuilderFlag", "INT8")
    assert trt11.has("Logger", "log") and trt11.has("Logger", "WARNING")  # members of ILogger, its base
    assert trt11.returned("OnnxParser", "get_error") == "ParserError"
    assert trt11.returned("Builder", "create_builder_config") == "IBuilderConfig"


def test_engine_code_conforms_to_both_surfaces(surfaces):
    sources = _engine_sources()
    assert "build.py" in sources
    assert conformance_problems(sources, surfaces) == []


def test_engine_code_uses_no_deprecated_api_on_11(surfaces):
    """11.x path: nothing deprecated. 10.16 marks MemoryPoolType.WORKSPACE deprecated; it is still the pool
    --memPoolSize=workspace sets, and STRONGLY_TYPED (deprecated on 11) is used on the 10.x path only. The precision
    flags INT8/FP16 (deprecated on 10.16, gone in 11) are used only by --implicit-int8, which asks for them."""
    assert deprecated_uses(_engine_sources(), surfaces) == {
        "11.4.0.106": [], "10.16.1.11": ["trt.MemoryPoolType.WORKSPACE", "trt.BuilderFlag.INT8", "trt.BuilderFlag.FP16"]}


def test_checker_sees_what_the_engine_code_uses(surfaces):
    """The checker tracks real uses: method calls through inferred classes are checked, not skipped."""
    seen = []

    class Spy(_Checker):
        def visit_Attribute(self, node):
            owner = None if _chain(node) else self.type_of(node.value)
            if owner:
                seen.append(f"{owner}.{node.attr}")
            super().visit_Attribute(node)

    for name, text in _engine_sources().items():
        Spy(name, surfaces, []).visit(ast.parse(text))
    for used in ("Builder.create_network", "OnnxParser.parse_from_file", "ParserError.node_name",
                 "IBuilderConfig.set_memory_pool_limit", "IOptimizationProfile.set_shape",
                 "ICudaEngine.get_tensor_dtype", "ITimingCache.serialize", "INetworkDefinition.get_input",
                 "IExecutionContext.execute_async_v3", "IExecutionContext.set_input_shape",
                 "IExecutionContext.set_optimization_profile_async", "IExecutionContext.set_tensor_address",
                 "ICudaEngine.get_tensor_profile_shape", "IPluginRegistry.load_library", "IBuilderConfig.set_flag"):
        assert used in seen


@pytest.mark.parametrize("source, before, after", [
    ("build.py", "config.builder_optimization_level = opt_level", "config.builder_optimisation_level = opt_level"),
    ("build.py", "config.set_timing_cache(cache, False)", "config.set_timing_cache(cache)"),
    ("build.py", "error.node_name()", "error.name()"),
    ("build.py", "engine.get_tensor_shape(name)", "engine.get_binding_shape(name)"),  # removed in TensorRT 10
    ("build.py", "trt.MemoryPoolType.WORKSPACE", "trt.MemoryPoolType.WORKSPACE_SIZE"),
    ("build.py", "registry.load_library(str(path))", "registry.load_plugin_library(str(path))"),
    # the 10.x-only implicit INT8 path: an 11.x-only name there, or the 10.x names outside the hasattr guard
    ("build.py", "config.int8_calibrator = CacheCalibrator()", "config.int8_calibrator = CacheCalibrator()\n"
                                                               "        trt.CausalMaskKind"),
    ("build.py", "    if hasattr(trt, \"IInt8EntropyCalibrator2\"):", "    if True:"),
    ("runtime.py", "self.context.execute_async_v3(int(self.stream))", "self.context.execute_async_v2(int(self.stream))"),
    ("runtime.py", "self.context.set_input_shape(name, shapes[name])", "self.context.set_binding_shape(0, shapes[name])"),
    ("runtime.py", "engine.get_tensor_profile_shape(n, k)", "engine.get_profile_shape(k, n)"),  # removed in 10
])
def test_checker_catches_mistakes_in_the_real_engine_code(surfaces, source, before, after):
    text = (ROOT / "trtglm" / "engine" / source).read_text()
    assert before in text
    assert conformance_problems({source: text.replace(before, after, 1)}, surfaces)


MADE_UP = '''
import tensorrt as trt

def build(logger: trt.ILogger):
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = None
    builder.build_engine_v9(config)
    trt.NoSuchThing
    config.set_timing_cache(config.create_timing_cache(b""))
    trt.Runtime(logger, 1)
'''

GUARDED = '''
import tensorrt as trt

def build(logger):
    config = trt.Builder(logger).create_builder_config()
    if hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = None
    else:
        config.builder_optimization_level = 3
'''


def test_checker_fails_on_removed_and_made_up_names(surfaces):
    problems = conformance_problems({"made_up.py": MADE_UP}, surfaces)
    text = "\n".join(problems)
    assert "trt.BuilderFlag.INT8 is not in TensorRT 11.4.0.106" in text  # removed in 11: on the 11 path
    assert "IBuilderConfig.int8_calibrator (on config) is not in TensorRT 11.4.0.106" in text
    assert "Builder.build_engine_v9 (on builder) is not in TensorRT 11.4.0.106, 10.16.1.11" in text
    assert "trt.NoSuchThing is not in TensorRT 11.4.0.106, 10.16.1.11" in text
    assert "IBuilderConfig.set_timing_cache with 1 positional argument(s) and keywords [] is not in" in text
    assert "Runtime.__init__ with 2 positional argument(s)" in text
    assert len(problems) == 6


def test_checker_follows_hasattr_feature_checks(surfaces):
    assert conformance_problems({"guarded.py": GUARDED}, surfaces) == []
    # the same names with the guard inverted run on the wrong versions
    inverted = GUARDED.replace('if hasattr(trt.BuilderFlag, "INT8")', 'if not hasattr(trt.BuilderFlag, "INT8")')
    assert conformance_problems({"inverted.py": inverted}, surfaces)
    dead = GUARDED.replace('"INT8"', '"INT9"')
    assert any("runs on no claimed TensorRT version" in p for p in conformance_problems({"dead.py": dead}, surfaces))


def test_checker_rejects_hidden_names(surfaces):
    hidden = "import tensorrt as nv\nfrom tensorrt import Builder\nimport tensorrt as trt\ngetattr(trt, 'Builder')\n"
    assert len(conformance_problems({"hidden.py": hidden}, surfaces)) == 3


# ---- commands -----------------------------------------------------------------------------------------------

PROFILES = [{"input_ids": ShapeProfile((1, 1), (4, 64), (8, 128)), "attention_mask": ShapeProfile((1, 1), (4, 64),
                                                                                                   (8, 128))},
            {"input_ids": ShapeProfile((1, 1), (1, 1), (8, 1)), "attention_mask": ShapeProfile((1, 2), (1, 65),
                                                                                                (8, 128))}]


def test_trtexec_command_two_profiles():
    cmd = trtexec_command(Path("out/model.int8.qdq.onnx"), Path("out/model.engine"), PROFILES, opt_level=4,
                          workspace_mb=2048, timing_cache=Path("out/timing.cache"))
    assert cmd == ("trtexec --onnx=out/model.int8.qdq.onnx --saveEngine=out/model.engine --stronglyTyped "
                   "--profile=0 --minShapes=input_ids:1x1,attention_mask:1x1 "
                   "--optShapes=input_ids:4x64,attention_mask:4x64 --maxShapes=input_ids:8x128,attention_mask:8x128 "
                   "--profile=1 --minShapes=input_ids:1x1,attention_mask:1x2 "
                   "--optShapes=input_ids:1x1,attention_mask:1x65 --maxShapes=input_ids:8x1,attention_mask:8x128 "
                   "--builderOptimizationLevel=4 --memPoolSize=workspace:2048M --timingCacheFile=out/timing.cache")
    assert cmd == trtexec_command(Path("out/model.int8.qdq.onnx"), Path("out/model.engine"), PROFILES, 4, 2048,
                                  Path("out/timing.cache"))


def test_trtexec_command_one_profile_defaults_and_quoting():
    profile = [{"x:0": ShapeProfile((1, 3), (2, 3), (4, 3)), "n": ShapeProfile((), (), ())}]
    cmd = trtexec_command(Path("my model.onnx"), Path("m.engine"), profile)
    assert shlex.split(cmd) == ["trtexec", "--onnx=my model.onnx", "--saveEngine=m.engine", "--stronglyTyped",
                                "--minShapes='x:0':1x3,n:scalar", "--optShapes='x:0':2x3,n:scalar",
                                "--maxShapes='x:0':4x3,n:scalar", "--builderOptimizationLevel=3"]


def test_polygraphy_command_two_profiles():
    cmd = polygraphy_command(Path("out/model.int8.qdq.onnx"), Path("out/model.polygraphy.engine"), PROFILES)
    assert cmd == ("polygraphy run out/model.int8.qdq.onnx --trt --onnxrt --strongly-typed "
                   "--trt-min-shapes 'input_ids:[1,1]' 'attention_mask:[1,1]' "
                   "--trt-opt-shapes 'input_ids:[4,64]' 'attention_mask:[4,64]' "
                   "--trt-max-shapes 'input_ids:[8,128]' 'attention_mask:[8,128]' "
                   "--trt-min-shapes 'input_ids:[1,1]' 'attention_mask:[1,2]' "
                   "--trt-opt-shapes 'input_ids:[1,1]' 'attention_mask:[1,65]' "
                   "--trt-max-shapes 'input_ids:[8,1]' 'attention_mask:[8,128]' "
                   "--save-engine out/model.polygraphy.engine")


# ---- without TensorRT ---------------------------------------------------------------------------------------

def _model(path: Path) -> Path:
    """x [batch, 4] float -> Relu -> y: a real ONNX model with one dynamic axis."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    x = np.array([[-1, 2, -3, 4]], np.float32)  # the file is a model ONNX Runtime runs
    assert np.array_equal(ort.InferenceSession(str(path)).run(None, {"x": x})[0], np.maximum(x, 0))
    return path


NO_TENSORRT = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                 reason="TensorRT is installed here; tests/gpu covers builds")


@NO_TENSORRT
def test_tensorrt_status_here_names_what_is_missing():
    available, reason = tensorrt_status()
    assert available is False
    assert "\n" not in reason and "tensorrt Python package is not installed" in reason


@NO_TENSORRT
def test_tensorrt_status_names_native_libraries_of_a_broken_install(tmp_path, monkeypatch):
    """A tensorrt package whose import fails the way a wheel without its native libraries does: never available."""
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("libnvinfer.so.10: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    available, reason = tensorrt_status()
    assert available is False
    assert reason == ("the tensorrt Python package is installed but its native libraries do not load "
                      "(libnvinfer.so.10: cannot open shared object file)")


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="an NVIDIA driver is installed here")
def test_gpu_problem_without_a_driver():
    assert gpu_problem() == "no NVIDIA driver found (libcuda is missing), so there is no GPU to build the engine on"


@NO_TENSORRT
def test_build_engine_without_tensorrt_raises_one_line_and_writes_nothing(tmp_path):
    onnx_path = _model(tmp_path / "m.onnx")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(TrtglmError) as e:
        build_engine(onnx_path, tmp_path / "out" / "m.engine", [{"x": ShapeProfile((1, 4), (2, 4), (8, 4))}],
                     timing_cache=tmp_path / "timing.cache")
    message = str(e.value)
    assert "\n" not in message and "m.engine not built" in message and "tensorrt Python package" in message
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("kwargs, error, words", [
    ({"profiles": [{"x": ShapeProfile((1, 5), (2, 5), (8, 5))}]}, ConfigError, "the model fixes it at 4"),
    ({"profiles": [{"nope": ShapeProfile((1,), (1,), (1,))}]}, ConfigError, "'nope' is not a model input"),
    ({"profiles": []}, ConfigError, None),
    ({"opt_level": 6}, ConfigError, "give 0..5"),
    ({"workspace_mb": 0}, ConfigError, "at least 1"),
])
def test_build_engine_checks_inputs_before_tensorrt(tmp_path, kwargs, error, words):
    onnx_path = _model(tmp_path / "m.onnx")
    args = {"profiles": [{"x": ShapeProfile((1, 4), (2, 4), (8, 4))}]} | kwargs
    with pytest.raises(error) as e:
        build_engine(onnx_path, tmp_path / "m.engine", **args)
    if words is not None:
        assert words in str(e.value)
    else:  # no profile for a dynamic input: named, before any TensorRT work
        assert "input 'x' has dynamic axes" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_build_engine_rejects_a_missing_or_broken_model(tmp_path):
    with pytest.raises(ModelError, match="file not found"):
        build_engine(tmp_path / "none.onnx", tmp_path / "m.engine", [])
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07not onnx")
    with pytest.raises(ModelError, match="not a readable ONNX file"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "m.engine", [])


def test_sidecar_path():
    assert sidecar_path(Path("out/model.engine")) == Path("out/model.engine.json")


def test_write_engine_writes_every_file_atomically_and_the_sidecar_reads_back(tmp_path):
    from trtglm.engine.build import read_sidecar, write_engine

    sidecar = {"format": "trtglm.engine/1", "plugins": ["lib.so"], "layers": {"count": 2, "int8": 1}}
    write_engine(tmp_path / "m.engine", b"plan", sidecar, [{"Name": "conv"}], (tmp_path / "t.cache", b"tc"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json", "m.engine.layers.json",
                                                          "t.cache"]
    assert (tmp_path / "m.engine").read_bytes() == b"plan" and (tmp_path / "t.cache").read_bytes() == b"tc"
    assert read_sidecar(tmp_path / "m.engine") == sidecar
    assert read_sidecar(tmp_path / "other.engine") == {}  # built by trtexec: no sidecar, nothing assumed
    (tmp_path / "bad.engine.json").write_text("{not json")
    assert read_sidecar(tmp_path / "bad.engine") == {}
    before = sorted(tmp_path.iterdir())
    with pytest.raises(TypeError):  # a sidecar that cannot be serialized: nothing written at all
        write_engine(tmp_path / "n.engine", b"plan", {"x": object()}, [])
    assert sorted(tmp_path.iterdir()) == before
