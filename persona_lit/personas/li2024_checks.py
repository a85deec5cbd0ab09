"""The adherence checks of Li et al. 2024 (persona drift), read as text and interpreted, never executed.

Data: shared/data/persona_drift_li2024/hundred_system_prompts.jsonl (SOURCES.md, A6; read by li2024.py). Each
record holds the upstream check as source text, e.g. `lambda x: fraction_starts_with(x, "a")`. It is never executed:
`ast.parse` gives a tree, `_compile` accepts only a whitelist (constants, lists, comparisons, and/or/not,
arithmetic on numbers, calls to HELPERS, a few `str` methods, indexing, one-level generators) and builds
closures over our own helpers. Anything else is a UserError.

The helpers are ours, written from the system prompts (the upstream definitions were never available to
us). Where upstream used external resources we approximate, as each docstring says: sentiment (a word
lexicon, not NLTK VADER), French (stop words, not langdetect), syllables (vowel groups), teenager style.
Checks needing a part-of-speech tagger or upstream's 10k frequent-word list are UNSUPPORTED (16, 30, 64).

Scores: `Li2024Check.score(answer)` is the check's value in [0, 1] (bools give 0/1, numbers are clamped);
`Li2024Check(answer)` is `score > 0.5`, strictly, so a neutral text does not pass "be mean"
((1 - compound) / 2 == 0.5) and one 'e' does not pass "never use e" (1 / (1 + 1)). Where a plain share
would pass ordinary text (most letters are lower case), a helper scores sentences or violations instead.
"""

from __future__ import annotations

import ast
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

from persona_lit.errors import UserError
from persona_lit.personas.li2024_helpers import CONSTANTS, HELPERS, UNSUPPORTED

THRESHOLD = 0.5  # a check passes when its score is strictly above this
MAX_SOURCE = 10_000  # characters of one check's source (upstream's longest is under 300)
_STR_METHODS = {"lower": str.lower, "upper": str.upper, "strip": str.strip, "split": str.split,
                "count": str.count, "startswith": str.startswith, "endswith": str.endswith}

# ---------------------------------------------------------------- the whitelist interpreter
Env = dict[str, Any]
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b}


def _typed(v: Any, types: tuple[type, ...], what: str) -> Any:
    if not isinstance(v, types):
        raise UserError(f"{what}, not {type(v).__name__}")
    return v


def _arith(op: ast.operator, a: Any, b: Any) -> Any:
    a, b = (_typed(v, (int, float), "arithmetic is allowed on numbers only") for v in (a, b))
    if isinstance(op, ast.Pow) and (abs(b) > 10 or abs(a) > 1e9):
        raise UserError("power out of the allowed range")
    return _ARITH[type(op)](a, b)


def _compare(op: ast.cmpop, a: Any, b: Any) -> bool:
    str_in_str = isinstance(a, str) and isinstance(b, str)
    if isinstance(op, (ast.In, ast.NotIn)) and not (str_in_str or isinstance(b, list)):
        raise UserError("`in` needs a string in a string, or a list")
    return _COMPARE[type(op)](a, b)


def _compile(node: ast.AST, scope: frozenset[str], unsupported: set[str]) -> Callable[[Env], Any]:
    """Closures for the whitelisted node types; anything else raises UserError."""
    rec = lambda n, s=scope: _compile(n, s, unsupported)  # noqa: E731
    if isinstance(node, ast.Constant) and type(node.value) in (str, int, float, bool):
        return lambda env: node.value
    if isinstance(node, ast.Name) and node.id in scope:
        return lambda env: env[node.id]
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return lambda env: CONSTANTS[node.id]
    if isinstance(node, ast.Name) and node.id in UNSUPPORTED:
        unsupported.add(node.id)
        return lambda env: None
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [rec(e) for e in node.elts]
        return lambda env: [f(env) for f in items]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        f = rec(node.operand)
        return lambda env: not f(env)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        f = rec(node.operand)
        return lambda env: -_typed(f(env), (int, float), "minus is allowed on numbers only")
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        a, b = rec(node.left), rec(node.right)
        return lambda env: _arith(node.op, a(env), b(env))
    if isinstance(node, ast.BoolOp):  # short-circuits like Python, but gives a bool (the data only uses bools)
        fs, every = [rec(v) for v in node.values], isinstance(node.op, ast.And)
        return lambda env: (all if every else any)(f(env) for f in fs)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:  # no a < b < c
        a, b = rec(node.left), rec(node.comparators[0])
        return lambda env: _compare(node.ops[0], a(env), b(env))
    if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
        seq, idx = rec(node.value), rec(node.slice)
        return lambda env: _typed(seq(env), (str, list), "indexing applies to strings and lists only")[
            _typed(idx(env), (int,), "an index must be an integer")]
    gen = node.generators[0] if isinstance(node, ast.GeneratorExp) and len(node.generators) == 1 else None
    if gen and isinstance(gen.target, ast.Name) and not gen.is_async:  # (elt for name in iter if ...)
        name, inner = gen.target.id, scope | {gen.target.id}
        it, elt, ifs = rec(gen.iter), rec(node.elt, inner), [rec(c, inner) for c in gen.ifs]
        return lambda env: (elt(e) for v in it(env) for e in [{**env, name: v}] if all(c(e) for c in ifs))
    if isinstance(node, ast.Call) and all(not isinstance(a, ast.Starred) for a in node.args) \
            and all(k.arg for k in node.keywords):
        args, kwargs = [rec(a) for a in node.args], {k.arg: rec(k.value) for k in node.keywords}
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _STR_METHODS:
            recv, fn = rec(func.value), _STR_METHODS[func.attr]
            args.insert(0, lambda env: _typed(recv(env), (str,), "string methods apply to strings only"))
        elif isinstance(func, ast.Name) and func.id in UNSUPPORTED:
            unsupported.add(func.id)
            return lambda env: None
        elif isinstance(func, ast.Name) and func.id in HELPERS:
            fn = HELPERS[func.id]
            try:
                inspect.signature(fn).bind(*node.args, **{k.arg: k.value for k in node.keywords})
            except TypeError as e:
                raise UserError(f"{func.id}: {e}") from None
            except ValueError:  # min and max have no signature; a wrong call fails when run
                pass
        else:
            raise UserError(f"call to {ast.unparse(func)!r} is not allowed; allowed: "
                            f"{', '.join(sorted(HELPERS))} and str.{', str.'.join(_STR_METHODS)}")
        return lambda env: fn(*[a(env) for a in args], **{k: f(env) for k, f in kwargs.items()})
    raise UserError(f"{ast.unparse(node)!r} ({type(node).__name__}) is not allowed in a check")


@dataclass(frozen=True)
class Li2024Check:
    """A parsed upstream check: `score(answer)` in [0, 1]; calling it gives `score(answer) > THRESHOLD`."""

    source: str
    fn: Callable[[Env], Any] = field(repr=False, compare=False)
    arg: str = "x"
    unsupported: str = ""  # why it cannot be scored; empty when supported

    @property
    def supported(self) -> bool:
        return not self.unsupported

    @property
    def spec(self) -> dict[str, Any]:
        """For persona_to_dict. Reading it back needs CHECKS["li2024"] = li2024_check (not registered here)."""
        return {"li2024": self.source}

    def score(self, answer: str) -> float:
        if self.unsupported:
            raise UserError(f"li2024 check {self.source!r} is not supported: {self.unsupported}")
        try:
            value = self.fn({self.arg: answer})
        except (IndexError, ZeroDivisionError):
            return 0.0  # e.g. `x.split()[0]` on an empty answer: the instruction was not followed
        except TypeError as e:
            raise UserError(f"li2024 check {self.source!r}: {e}") from None
        return min(1.0, max(0.0, float(_typed(value, (bool, int, float), "a check must give a number or bool"))))

    def __call__(self, answer: str) -> bool:
        return self.score(answer) > THRESHOLD

    def __reduce__(self) -> tuple[Any, ...]:  # deepcopy by source: the compiled closures cannot be copied
        return compile_check, (self.source,)


def compile_check(source: str) -> Li2024Check:
    """Parse `lambda x: ...` with ast (never executed) into a Li2024Check; UserError outside the whitelist."""
    if len(source) > MAX_SOURCE:
        raise UserError(f"a check of {len(source)} characters; allowed: at most {MAX_SOURCE}")
    try:
        lam = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as e:
        raise UserError(f"not a Python expression ({e.msg})") from None
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes; nesting too deep for the parser
        raise UserError(f"not a Python expression ({type(e).__name__})") from None
    a = lam.args if isinstance(lam, ast.Lambda) else None
    if a is None or len(a.args) != 1 or a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults:
        raise UserError("a check must be `lambda x: <expression>` with one argument")
    unsupported: set[str] = set()
    try:
        fn = _compile(lam.body, frozenset({a.args[0].arg}), unsupported)
    except RecursionError:
        raise UserError("a check nested too deeply") from None
    return Li2024Check(source, fn, a.args[0].arg, "; ".join(f"{n} {UNSUPPORTED[n]}" for n in sorted(unsupported)))


def li2024_check(answer: str, source: str) -> bool:
    """CHECKS-style (answer, argument) -> bool, to register as CHECKS["li2024"] where round trips are needed."""
    return compile_check(source)(answer)
