"""The routing table (events/routing.py) against the code, read statically with ``ast``:

- every message class has exactly one row, on a stream that carries its kind;
- streams: every append in services/ (``Append(keys.X, msg)``, ``bus.send(keys.X, msg)``,
  ``bus.append(keys.X, *msgs)``, ``bus.append_events(msgs)``) puts each message on its row's stream;
- producers: the messages each service appends are exactly those whose row names it (and a
  message a service builds without appending it is listed below, with why);
- consumers: the streams each service reads (its consumer group's, or its xread's) and the types it
  handles (isinstance, ``case m.X()``, a dict keyed by class, type strings compared; and every
  event, for a reader that folds the log into State, but those its group skips unread) are exactly
  its rows' consumers;
- State folds every event of the log, and nothing else.

Where a message is appended, the test follows names back to where they were assigned, returned,
appended to a list or passed as an argument, within the service's own modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from events import messages as m
from events import routing
from events.keys import Keys
from events.routing import ROUTES, Route, Stream

ROOT = Path(__file__).resolve().parent.parent
TYPES = m.message_types()
TYPE_OF_CLASS = {cls.__name__: name for name, cls in TYPES.items()}
STREAM_ATTRS = {stream.value: stream for stream in Stream if stream is not Stream.NODE}  # keys.<attr>

# Messages a service builds without appending them, (service, type) -> why.
BUILT_NOT_SENT = {
    ("gateway", "job.accepted"): "its projection shows a submitted job not decided yet as it will be",
    ("scheduler", "job.cancel"): "a sweep's cancel is decided as a cancel of each of its jobs",
    ("scheduler", "queue.process"): "the cause of the scheduling pass made on taking the lead",
}
# Shared modules, and the services whose processes run them: the heartbeat of every service
# (services.runtime.serve runs each one, and its heartbeat_loop).
SHARED = {"runtime": routing.SERVICES}


# --- reading the source ------------------------------------------------------------------------


@dataclass
class Module:
    path: Path
    tree: ast.Module
    parents: dict[ast.AST, ast.AST] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)  # a local name -> the message type it names
    modules: set[str] = field(default_factory=set)  # local names of events.messages
    imports: set[str] = field(default_factory=set)  # modules it imports from

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    def message_type(self, expr: ast.expr) -> str | None:
        """The type a class reference names (``m.JobFailed``, or ``JobFailed`` imported)."""
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id in self.modules:
            return TYPE_OF_CLASS.get(expr.attr)
        if isinstance(expr, ast.Name):
            return self.classes.get(expr.id)
        return None

    def constant(self, name: str) -> ast.expr | None:
        """The value of a module-level assignment."""
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return node.value
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return node.value
        return None

    def calls(self) -> Iterator[ast.Call]:
        return (node for node in ast.walk(self.tree) if isinstance(node, ast.Call))


@cache
def parse(path: Path) -> Module:
    module = Module(path, ast.parse(path.read_text(), str(path)))
    for node in ast.walk(module.tree):
        for child in ast.iter_child_nodes(node):
            module.parents[child] = node
        if isinstance(node, ast.ImportFrom) and node.module:
            module.imports.add(node.module)
            for alias in node.names:
                local = alias.asname or alias.name
                if node.module == "events" and alias.name == "messages":
                    module.modules.add(local)
                elif node.module == "events.messages" and alias.name in TYPE_OF_CLASS:
                    module.classes[local] = TYPE_OF_CLASS[alias.name]
                else:
                    module.imports.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                module.imports.add(alias.name)
                if alias.name == "events.messages" and alias.asname:
                    module.modules.add(alias.asname)
    return module


def last_name(expr: ast.expr) -> str | None:
    """``f`` of ``f``, ``self.f`` or ``a.b.f``."""
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        return expr.attr
    return None


def stream_of(expr: ast.expr) -> Stream | None:
    """The stream a key expression names: ``keys.events``, ``self.bus.keys.commands``, ``keys.node(n)``."""
    if isinstance(expr, ast.Attribute) and expr.attr in STREAM_ATTRS and last_name(expr.value) == "keys":
        return STREAM_ATTRS[expr.attr]
    if (
        isinstance(expr, ast.Call)
        and isinstance(expr.func, ast.Attribute)
        and expr.func.attr == "node"
        and last_name(expr.func.value) == "keys"
    ):
        return Stream.NODE
    return None


def target_names(target: ast.expr) -> set[str]:
    return {node.id for node in ast.walk(target) if isinstance(node, ast.Name)}


def assignment(node: ast.AST) -> tuple[list[ast.expr], ast.expr | None]:
    """The targets of an assignment or a loop, and what it gives them."""
    if isinstance(node, ast.Assign):
        return node.targets, node.value
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target], node.value
    if isinstance(node, (ast.For, ast.AsyncFor)):
        return [node.target], node.iter
    return [], None


FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)


class Flow:
    """Which message types an expression may hold, followed through a set of modules."""

    def __init__(self, modules: Iterable[Module]) -> None:
        self.modules = list(modules)
        self.functions: dict[str, list[tuple[Module, ast.FunctionDef | ast.AsyncFunctionDef]]] = {}
        self.callers: dict[str, list[tuple[Module, ast.Call]]] = {}
        for module in self.modules:
            for node in ast.walk(module.tree):
                if isinstance(node, FUNCTIONS):
                    self.functions.setdefault(node.name, []).append((module, node))
                elif isinstance(node, ast.Call) and (called := last_name(node.func)) is not None:
                    self.callers.setdefault(called, []).append((module, node))
        self._following: set[int] = set()

    def types(self, module: Module, expr: ast.expr | None) -> set[str]:
        if expr is None or id(expr) in self._following:
            return set()
        self._following.add(id(expr))
        try:
            return self._types(module, expr)
        finally:
            self._following.discard(id(expr))

    def _types(self, module: Module, expr: ast.expr) -> set[str]:
        if isinstance(expr, ast.Call):
            built = module.message_type(expr.func)
            if built is not None:
                return {built}
            if isinstance(expr.func, ast.Attribute) and expr.func.attr == "model_copy":
                return self.types(module, expr.func.value)
            found = self.returns(last_name(expr.func))
            for arg in expr.args:  # a function handed over to be called (anyio.to_thread.run_sync(f, ...))
                if isinstance(arg, (ast.Name, ast.Attribute)) and last_name(arg) in self.functions:
                    found |= self.returns(last_name(arg))
            return found
        if isinstance(expr, (ast.Await, ast.Starred, ast.NamedExpr, ast.Subscript)):
            return self.types(module, expr.value)
        if isinstance(expr, ast.IfExp):
            return self.types(module, expr.body) | self.types(module, expr.orelse)
        if isinstance(expr, ast.BoolOp):
            return set().union(*(self.types(module, value) for value in expr.values))
        if isinstance(expr, ast.BinOp):
            return self.types(module, expr.left) | self.types(module, expr.right)
        if isinstance(expr, (ast.List, ast.Tuple, ast.Set)):
            return set().union(*(self.types(module, elt) for elt in expr.elts))
        if isinstance(expr, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
            return self.types(module, expr.elt)
        if isinstance(expr, ast.Name):
            return self.bindings(module, expr)
        return set()

    def returns(self, name: str | None) -> set[str]:
        found: set[str] = set()
        for module, function in self.functions.get(name or "", []):
            for node in ast.walk(function):
                if isinstance(node, ast.Return):
                    found |= self.types(module, node.value)
        return found

    def bindings(self, module: Module, name: ast.Name) -> set[str]:
        """What a name was given in its scope: assignments, loop targets, list appends, arguments."""
        scope: ast.AST = module.tree
        node: ast.AST = name
        while (node := module.parents.get(node)) is not None:  # type: ignore[assignment]
            if isinstance(node, COMPREHENSIONS):
                for generator in node.generators:
                    if name.id in target_names(generator.target):
                        return self.types(module, generator.iter)
            if isinstance(node, (*FUNCTIONS, ast.Lambda)):
                scope = node
                break
        found: set[str] = set()
        for node in ast.walk(scope):
            targets, value = assignment(node)
            if any(name.id in target_names(target) for target in targets):
                found |= self.types(module, value)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("append", "extend", "insert")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == name.id
            ):
                found |= set().union(*(self.types(module, arg) for arg in node.args))
        if isinstance(scope, FUNCTIONS):
            found |= self.arguments(scope, name.id)
        return found

    def arguments(self, function: ast.FunctionDef | ast.AsyncFunctionDef, parameter: str) -> set[str]:
        """What the callers of a function pass for one of its parameters."""
        positional = [a.arg for a in (*function.args.posonlyargs, *function.args.args)]
        if parameter not in positional and parameter not in [a.arg for a in function.args.kwonlyargs]:
            return set()
        found: set[str] = set()
        for module, call in self.callers.get(function.name, []):
            for keyword in call.keywords:
                if keyword.arg == parameter:
                    found |= self.types(module, keyword.value)
            if parameter in positional:
                index = positional.index(parameter)
                if positional[:1] in (["self"], ["cls"]) and isinstance(call.func, ast.Attribute):
                    index -= 1
                if 0 <= index < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[:index]):
                    found |= self.types(module, call.args[index])
        return found


@dataclass(frozen=True)
class Send:
    where: str
    stream: Stream | None
    types: frozenset[str]


def sends(flow: Flow, module: Module) -> Iterator[Send]:
    """Every append of messages to a stream in a module."""
    for call in module.calls():
        called = last_name(call.func)
        arguments = {k.arg: k.value for k in call.keywords if k.arg}
        where = f"{module.name}:{call.lineno}"
        if called == "Append":
            stream = call.args[0] if call.args else arguments.get("stream")
            message = call.args[1] if len(call.args) > 1 else arguments.get("message")
            assert stream is not None and message is not None, where
            yield Send(where, stream_of(stream), frozenset(flow.types(module, message)))
        elif called in ("send", "append") and call.args and (stream_of(call.args[0]) is not None):
            types = set().union(*(flow.types(module, arg) for arg in call.args[1:]))
            yield Send(where, stream_of(call.args[0]), frozenset(types))
        elif called == "append_events" and call.args:
            yield Send(where, Stream.EVENTS, frozenset(flow.types(module, call.args[0])))


def built(module: Module) -> set[str]:
    """The message types a module constructs."""
    return {t for call in module.calls() if (t := module.message_type(call.func)) is not None}


def strings(module: Module, expr: ast.expr, depth: int = 0) -> set[str]:
    """The message type strings an expression holds: a literal, a collection of them, a constant."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value} & TYPES.keys()
    if isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(strings(module, e, depth) for e in expr.elts))
    if isinstance(expr, ast.Call) and last_name(expr.func) in ("frozenset", "set", "tuple") and expr.args:
        return strings(module, expr.args[0], depth)
    if isinstance(expr, ast.Name) and depth < 3 and (value := module.constant(expr.id)) is not None:
        return strings(module, value, depth + 1)
    return set()


def classes(module: Module, expr: ast.expr, depth: int = 0) -> set[str]:
    """The message types an isinstance's second argument names."""
    named = module.message_type(expr)
    if named is not None:
        return {named}
    if isinstance(expr, ast.Tuple):
        return set().union(*(classes(module, e, depth) for e in expr.elts))
    if isinstance(expr, ast.Name) and depth < 3 and (value := module.constant(expr.id)) is not None:
        return classes(module, value, depth + 1)
    return set()


def handled(module: Module, within: ast.AST | None = None) -> set[str]:
    """Types a module (or one function of it) tells apart: isinstance, match, a dict keyed by class, type
    strings compared."""
    found: set[str] = set()
    for node in ast.walk(within or module.tree):
        if isinstance(node, ast.Call) and last_name(node.func) == "isinstance" and len(node.args) == 2:
            found |= classes(module, node.args[1])
        elif isinstance(node, ast.MatchClass) and (named := module.message_type(node.cls)) is not None:
            found.add(named)
        elif isinstance(node, ast.Dict):  # a table of handlers by class
            found |= {named for key in node.keys if key is not None and (named := module.message_type(key))}
        elif isinstance(node, ast.Compare) and all(
            isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops
        ):
            for side in (node.left, *node.comparators):
                found |= strings(module, side)
    return found


# --- the services ------------------------------------------------------------------------------


def service_names() -> tuple[str, ...]:
    """``SERVICES`` of services/cli.py: the processes ``swift-trainer`` runs."""
    cli = parse(ROOT / "services" / "cli.py")
    value = cli.constant("SERVICES")
    assert isinstance(value, ast.Tuple), "services/cli.py: SERVICES is not a tuple"
    return tuple(e.value for e in value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))


SERVICE_NAMES = service_names()


@cache
def service_modules(service: str) -> tuple[Module, ...]:
    """A service's package, the top-level services modules it imports, and the shared ones it runs."""
    package = ROOT / "services" / service.replace("-", "_")
    own = [parse(path) for path in sorted(package.rglob("*.py"))]
    top = {path.stem: path for path in (ROOT / "services").glob("*.py")}
    used = {name.split(".")[1] for module in own for name in module.imports if name.startswith("services.")}
    used |= {name for name, runners in SHARED.items() if service in runners}
    return (*own, *(parse(top[name]) for name in sorted(used) if name in top))


@cache
def flow(service: str) -> Flow:
    return Flow(service_modules(service))


def service_sends(service: str) -> list[Send]:
    return [send for module in service_modules(service) for send in sends(flow(service), module)]


def reads(module: Module) -> set[Stream]:
    """The streams a module reads messages from: its consumer groups', xread's, and ranges'."""
    found: set[Stream] = set()
    for call in module.calls():
        called = last_name(call.func)
        keys: list[ast.expr] = []
        if called == "GroupConsumer":
            streams = call.args[2] if len(call.args) > 2 else {k.arg: k.value for k in call.keywords}.get("streams")
            keys = list(streams.elts) if isinstance(streams, (ast.List, ast.Tuple)) else []
        elif called == "xread" and call.args and isinstance(call.args[0], ast.Dict):
            keys = [key for key in call.args[0].keys if key is not None]
        elif called in ("entries", "messages", "xrange", "xrevrange") and call.args:
            keys = [call.args[0]]
        found |= {stream for key in keys if (stream := stream_of(key)) is not None}
    return found


def folds(module: Module) -> bool:
    """Whether a module folds the log's events into a State."""
    for call in module.calls():
        if last_name(call.func) in ("apply_entry", "catch_up"):
            return True
        if isinstance(call.func, ast.Attribute) and call.func.attr == "apply" and last_name(call.func.value) == "state":
            return True
    return False


def skipped(service: str, module: Module) -> set[str]:
    """Types a consumer group acknowledges unread (its ``skip``)."""
    found: set[str] = set()
    for call in module.calls():
        if last_name(call.func) != "GroupConsumer":
            continue
        skip = {k.arg: k.value for k in call.keywords}.get("skip")
        if skip is not None:
            for owner, function in flow(service).functions.get(last_name(skip) or "", []):
                found |= handled(owner, function)
    return found


@cache
def folded() -> set[str]:
    """The types events.state.State folds: the keys of HANDLERS in events/transitions.py."""
    state = parse(ROOT / "events" / "transitions.py")
    table = state.constant("HANDLERS")
    assert isinstance(table, ast.Dict), "events/transitions.py: HANDLERS is not a dict"
    return {t for key in table.keys if key is not None and (t := state.message_type(key)) is not None}


def names(types: Iterable[str]) -> str:
    return ", ".join(sorted(types)) or "none"


def differences(*lines: str) -> str:
    """The lines that name something."""
    return "\n".join(line for line in lines if not line.endswith(": none"))


# --- the table itself --------------------------------------------------------------------------


def test_every_message_class_has_one_row() -> None:
    missing, extra = TYPES.keys() - ROUTES.keys(), ROUTES.keys() - TYPES.keys()
    assert not missing, f"message types without a row in events/routing.py ROUTES: {names(missing)}"
    assert not extra, f"rows of events/routing.py ROUTES that are no message type: {names(extra)}"


@pytest.mark.parametrize("kind", sorted(ROUTES), ids=str)
def test_a_row_names_a_stream_of_its_kind_and_its_ends(kind: str) -> None:
    route = ROUTES[kind]
    cls = TYPES[kind]
    assert issubclass(cls, route.stream.kind), (
        f"{kind} is a {cls.kind}, but its row puts it on {route.stream}, a stream of {route.stream.kind.kind}s"
    )
    assert route.producers, f"{kind}: its row names no producer"
    assert route.consumers, f"{kind}: its row names no consumer"


def test_streams_are_keys() -> None:
    keys = Keys("ns")
    assert {stream.key(keys, "n1") for stream in Stream} == {
        keys.commands,
        keys.events,
        keys.telemetry,
        keys.exports,
        keys.node("n1"),
    }


def test_the_services_are_the_cli_s() -> None:
    assert set(SERVICE_NAMES) == routing.SERVICES, "events/routing.py SERVICES differs from services/cli.py"
    for service in SERVICE_NAMES:
        assert (ROOT / "services" / service.replace("-", "_") / "__init__.py").exists(), service


def test_the_docstring_shows_the_table() -> None:
    assert routing.__doc__ is not None
    assert routing.render() in routing.__doc__, (
        "events/routing.py's docstring shows another table: paste in the output of `python -m events.routing`"
    )


def test_a_route_names_services_only() -> None:
    with pytest.raises(ValueError, match="not a service"):
        Route(Stream.EVENTS, frozenset({"runer"}), frozenset({"scheduler"}))


def test_state_folds_every_event_of_the_log() -> None:
    logged = {kind for kind, route in ROUTES.items() if route.stream is Stream.EVENTS}
    assert folded() == logged, (
        f"events/transitions.py HANDLERS: no fold for {names(logged - folded())}; "
        f"a fold for types not on the log: {names(folded() - logged)}"
    )


# --- the table against the code ----------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_each_message_is_appended_to_its_row_s_stream(service: str) -> None:
    wrong = []
    for send in service_sends(service):
        assert send.types, f"{send.where}: cannot tell which messages this appends (name them where appended)"
        for kind in sorted(send.types):
            if send.stream != ROUTES[kind].stream:
                wrong.append(f"{send.where} appends {kind} to {send.stream}; its row says {ROUTES[kind].stream}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_a_service_produces_what_its_rows_say(service: str) -> None:
    sent = {kind for send in service_sends(service) for kind in send.types}
    declared = {kind for kind, route in ROUTES.items() if service in route.producers}
    assert sent == declared, differences(
        f"{service} appends, but is not their producer in events/routing.py: {names(sent - declared)}",
        f"{service} is their producer in events/routing.py, but never appends them: {names(declared - sent)}",
    )
    made = set().union(*(built(module) for module in service_modules(service)))
    local = {kind for (owner, kind) in BUILT_NOT_SENT if owner == service}
    assert made - sent == local, differences(
        f"{service} builds, and appends nowhere this test can see (if they stay in the process, list them "
        f"in BUILT_NOT_SENT with why): {names(made - sent - local)}",
        f"BUILT_NOT_SENT lists, but {service} no longer builds them without appending: {names(local - (made - sent))}",
    )


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_a_service_consumes_what_its_rows_say(service: str) -> None:
    modules = service_modules(service)
    read = set().union(*(reads(module) for module in modules))
    arriving = {kind for kind, route in ROUTES.items() if route.stream in read}
    told_apart = set().union(*(handled(module) for module in modules))
    if any(folds(module) for module in modules):
        told_apart |= folded()
    unread = set().union(*(skipped(service, module) for module in modules))
    consumed = (told_apart & arriving) - unread
    declared = {kind for kind, route in ROUTES.items() if service in route.consumers}
    streams = {ROUTES[kind].stream for kind in declared}
    assert streams <= read, f"{service} reads {names(read)}, not {names(streams - read)}, where its rows put it"
    assert consumed == declared, differences(
        f"{service} reads and handles, but is not their consumer in events/routing.py: {names(consumed - declared)}",
        f"{service} is their consumer in events/routing.py, but does not handle them: {names(declared - consumed)}",
    )


def test_no_other_module_appends_messages() -> None:
    """A module of services/ outside the services' own modules that appended would go unchecked."""
    covered = {module.path for service in SERVICE_NAMES for module in service_modules(service)}
    everyone = Flow(parse(path) for path in (ROOT / "services").rglob("*.py"))
    stray = [
        send.where for module in everyone.modules if module.path not in covered for send in sends(everyone, module)
    ]
    assert not stray, f"appends outside any service's modules: {stray}"
