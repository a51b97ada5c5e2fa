"""Procedurally generated problems whose answers are computed, then checked a second way.

Every generator draws its parameters from a ``random.Random`` (seeded by the caller), computes
the answer exactly (``fractions.Fraction``, integers, brute force over finite models) and
returns a :class:`Problem` with the question, a worked solution and the answer. The answer is
then re-derived by :func:`check_problem` from the *question's own data* by a different route
(substitution instead of solving, model checking instead of a table of valid forms, a parser
instead of the generator's tree, ...): a problem whose two derivations disagree is a bug, and
``generate_problems`` refuses to emit it (``ProblemCheckError``).

Kinds, their content type and what sets their difficulty (0 easy .. 1 hard):

=================  ============  =============================================================
kind               type          difficulty from
=================  ============  =============================================================
arithmetic         mathematics   operand digits and expression depth
linear_equation    mathematics   coefficient size, fractions in the answer
gcd                mathematics   operand size (number of Euclid steps)
modular_power      mathematics   exponent and modulus size
sequence           mathematics   arithmetic vs geometric vs quadratic rule
sum_identity       mathematics   which closed form (a small proof by induction)
propositional      philosophy    number of variables and connectives
syllogism          philosophy    figure; invalid forms are harder than valid ones
knights_knaves     philosophy    number of islanders
kinematics         scientific    number of given quantities and their size
unit_conversion    scientific    compound units
=================  ============  =============================================================
"""

from __future__ import annotations

import ast
import itertools
import math
import operator
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from swarmlm.data.errors import DataError

__all__ = [
    "CHECKABLE_KINDS",
    "KINDS_BY_TYPE",
    "PROBLEM_KINDS",
    "Problem",
    "ProblemCheckError",
    "check_problem",
    "generate_problem",
    "generate_problems",
]


class ProblemCheckError(DataError):
    """A generated problem's answer failed its independent check (a generator bug)."""


@dataclass(frozen=True)
class Problem:
    """One problem. ``data`` holds what ``check_problem`` needs (JSON-serialisable)."""

    kind: str
    content_type: str
    question: str
    solution: str
    answer: str
    difficulty: float
    data: dict[str, Any] = field(default_factory=dict)

    def as_text(self) -> str:
        """The problem as training text: question, worked solution, final answer."""
        return f"Problem: {self.question}\nSolution: {self.solution}\nAnswer: {self.answer}\n"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "content_type": self.content_type,
            "question": self.question,
            "solution": self.solution,
            "answer": self.answer,
            "difficulty": self.difficulty,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(
            kind=str(d["kind"]),
            content_type=str(d["content_type"]),
            question=str(d["question"]),
            solution=str(d["solution"]),
            answer=str(d["answer"]),
            difficulty=float(d["difficulty"]),
            data=dict(d.get("data", {})),
        )


def _fmt(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _signed(v: int) -> str:
    return f"+ {v}" if v >= 0 else f"- {-v}"


def _parse_fraction(s: str) -> Fraction:
    return Fraction(s.strip())


# ---- mathematics -------------------------------------------------------------------------

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _expr(rng: random.Random, depth: int, digits: int) -> tuple[str, Fraction]:
    if depth == 0:
        v = rng.randint(1, 10**digits - 1)
        return str(v), Fraction(v)
    op = rng.choice("+-*")
    left, lv = _expr(rng, rng.randint(0, depth - 1), digits)
    right, rv = _expr(rng, depth - 1, digits)
    if op == "*" and depth > 1:  # keep products of big subtrees from exploding
        right, rv = _expr(rng, 0, max(1, digits - 1))
    return f"({left} {op} {right})", _OPS[op](lv, rv)


def arithmetic(rng: random.Random, level: float) -> Problem:
    digits = 1 + round(level * 3)
    depth = 1 + round(level * 3)
    text, value = _expr(rng, depth, digits)
    text = text[1:-1] if text.startswith("(") else text
    return Problem(
        "arithmetic",
        "mathematics",
        f"Compute {text}.",
        f"Evaluating innermost parentheses first, left to right, gives {_fmt(value)}.",
        _fmt(value),
        level,
        {"expression": text},
    )


def linear_equation(rng: random.Random, level: float) -> Problem:
    span = 3 + round(level * 30)
    while True:
        a, c = rng.randint(-span, span), rng.randint(-span, span)
        if a != c and a != 0:
            break
    b, d = rng.randint(-5 * span, 5 * span), rng.randint(-5 * span, 5 * span)
    if level < 0.5:  # easy: make the solution an integer
        x_int = rng.randint(-span, span)
        d = (a - c) * x_int + b
    x = Fraction(d - b, a - c)
    question = f"Solve for x: {a}x {_signed(b)} = {c}x {_signed(d)}."
    solution = (
        f"Subtract {c}x and {b} from both sides: {a - c}x = {d - b}. "
        f"Divide by {a - c}: x = {_fmt(x)}."
    )
    return Problem(
        "linear_equation", "mathematics", question, solution, _fmt(x), level, {"abcd": [a, b, c, d]}
    )


def gcd_problem(rng: random.Random, level: float) -> Problem:
    hi = 10 ** (2 + round(level * 4))
    g = rng.randint(1, max(2, hi // 100))
    a, b = g * rng.randint(2, hi // g + 2), g * rng.randint(2, hi // g + 2)
    steps = []
    x, y = a, b
    while y:
        steps.append(f"{x} = {x // y}*{y} + {x % y}")
        x, y = y, x % y
    return Problem(
        "gcd",
        "mathematics",
        f"Find the greatest common divisor of {a} and {b}.",
        "By Euclid's algorithm: " + "; ".join(steps) + f". The last non-zero remainder is {x}.",
        str(x),
        level,
        {"a": a, "b": b},
    )


def modular_power(rng: random.Random, level: float) -> Problem:
    base = rng.randint(2, 50)
    exp = rng.randint(2, 10 + round(level * 500))
    mod = rng.randint(3, 20 + round(level * 2000))
    result = 1
    b, e, squarings = base % mod, exp, []
    while e:
        if e & 1:
            result = result * b % mod
        squarings.append(str(b))
        b, e = b * b % mod, e >> 1
    return Problem(
        "modular_power",
        "mathematics",
        f"Compute {base}^{exp} mod {mod}.",
        f"Square and multiply over the binary digits of {exp} ({exp:b}); the successive squares "
        f"mod {mod} are {', '.join(squarings)}; multiplying those at the 1 bits gives {result}.",
        str(result),
        level,
        {"base": base, "exp": exp, "mod": mod},
    )


def sequence(rng: random.Random, level: float) -> Problem:
    rule = "arithmetic" if level < 0.34 else "geometric" if level < 0.67 else "quadratic"
    a0 = rng.randint(-20, 20)
    if rule == "arithmetic":
        d = rng.choice([k for k in range(-9, 10) if k])
        terms = [a0 + d * i for i in range(6)]
        why = f"each term adds {d}"
    elif rule == "geometric":
        a0 = a0 or 1
        r = rng.choice([-3, -2, 2, 3, 4])
        terms = [a0 * r**i for i in range(6)]
        why = f"each term is multiplied by {r}"
    else:
        p, q = rng.randint(1, 4), rng.randint(-5, 5)
        terms = [p * i * i + q * i + a0 for i in range(6)]
        why = f"the differences grow by {2 * p} each step (second differences are constant)"
    shown, nxt = terms[:5], terms[5]
    return Problem(
        "sequence",
        "mathematics",
        f"What is the next term of the sequence {', '.join(map(str, shown))}?",
        f"The rule is {rule}: {why}, so the next term is {nxt}.",
        str(nxt),
        level,
        {"terms": shown},
    )


_SUM_IDENTITIES: list[tuple[str, str, Callable[[int], int], Callable[[int], int], str]] = [
    ("1 + 2 + ... + n", "n(n+1)/2", lambda k: k, lambda n: n * (n + 1) // 2, "n+1"),
    ("1 + 3 + 5 + ... + (2n-1)", "n^2", lambda k: 2 * k - 1, lambda n: n * n, "2n+1"),
    (
        "1^2 + 2^2 + ... + n^2",
        "n(n+1)(2n+1)/6",
        lambda k: k * k,
        lambda n: n * (n + 1) * (2 * n + 1) // 6,
        "(n+1)^2",
    ),
    (
        "1^3 + 2^3 + ... + n^3",
        "(n(n+1)/2)^2",
        lambda k: k**3,
        lambda n: (n * (n + 1) // 2) ** 2,
        "(n+1)^3",
    ),
    ("1 + 2 + 4 + ... + 2^(n-1)", "2^n - 1", lambda k: 2 ** (k - 1), lambda n: 2**n - 1, "2^n"),
]


def sum_identity(rng: random.Random, level: float) -> Problem:
    idx = min(len(_SUM_IDENTITIES) - 1, int(level * len(_SUM_IDENTITIES)))
    lhs, rhs, _, closed, next_term = _SUM_IDENTITIES[idx]
    n = rng.randint(3, 30 + round(level * 200))
    value = closed(n)
    proof = (
        f"Claim: {lhs} = {rhs} for every n >= 1. Base case n = 1: both sides equal "
        f"{closed(1)}. Inductive step: if the claim holds for n, adding the next term {next_term} "
        f"to both sides gives the closed form at n+1 (expand and compare). "
        f"Hence for n = {n} the sum is {value}."
    )
    return Problem(
        "sum_identity",
        "mathematics",
        f"Prove a closed form for {lhs} and use it to evaluate the sum for n = {n}.",
        proof,
        str(value),
        level,
        {"identity": idx, "n": n},
    )


# ---- logic (philosophy) ------------------------------------------------------------------

_CONNECTIVES = ("and", "or", "implies", "iff")


def _formula(rng: random.Random, names: list[str], size: int) -> tuple[str, Any]:
    """A random formula as (text, tree); a tree is a name, ("not", name) or (op, left, right)."""
    if size <= 0:
        v = rng.choice(names)
        return (f"not {v}", ("not", v)) if rng.random() < 0.3 else (v, v)
    left = rng.randint(0, size - 1)
    op = rng.choice(_CONNECTIVES)
    lt, ltree = _formula(rng, names, left)
    rt, rtree = _formula(rng, names, size - 1 - left)
    return f"({lt} {op} {rt})", (op, ltree, rtree)


def _tree_value(tree: Any, env: dict[str, bool]) -> bool:
    """The generator's evaluation, over its own tree (the checker parses the text instead)."""
    if isinstance(tree, str):
        return env[tree]
    if tree[0] == "not":
        return not env[tree[1]]
    op, left, right = tree
    a, b = _tree_value(left, env), _tree_value(right, env)
    return {"and": a and b, "or": a or b, "implies": (not a) or b, "iff": a == b}[op]


def _tokenize_formula(text: str) -> list[str]:
    return text.replace("(", " ( ").replace(")", " ) ").split()


def evaluate_formula(text: str, env: dict[str, bool]) -> bool:
    """Evaluate a fully parenthesised formula of ``not``/``and``/``or``/``implies``/``iff``."""
    tokens = _tokenize_formula(text)
    pos = 0

    def parse() -> bool:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "not":
            return not parse()
        if tok == "(":
            left = parse()
            op = tokens[pos]
            pos += 1
            right = parse()
            if tokens[pos] != ")":
                raise ValueError(f"expected ')' at token {pos} of {text!r}")
            pos += 1
            if op == "and":
                return left and right
            if op == "or":
                return left or right
            if op == "implies":
                return (not left) or right
            if op == "iff":
                return left == right
            raise ValueError(f"unknown connective {op!r} in {text!r}")
        if tok not in env:
            raise ValueError(f"unknown variable {tok!r} in {text!r}")
        return env[tok]

    value = parse()
    if pos != len(tokens):
        raise ValueError(f"trailing tokens in {text!r}")
    return value


def propositional(rng: random.Random, level: float) -> Problem:
    n_vars = 2 + round(level * 2)
    names = ["p", "q", "r", "s"][:n_vars]
    formula, tree = _formula(rng, names, 1 + round(level * 4))
    models = [
        dict(zip(names, bits, strict=True))
        for bits in itertools.product([False, True], repeat=n_vars)
    ]
    true_models = [m for m in models if _tree_value(tree, m)]
    if rng.random() < 0.5:
        env = rng.choice(models)
        value = _tree_value(tree, env)
        given = ", ".join(f"{k} = {v}" for k, v in env.items())
        return Problem(
            "propositional",
            "philosophy",
            f"Let {given}. Is the formula {formula} true or false?",
            "Evaluate each connective from the inside out ('implies' is false only when its "
            f"left side is true and its right side false): the formula is {value}.",
            str(value).lower(),
            level,
            {"formula": formula, "env": env, "question": "value"},
        )
    status = (
        "tautology"
        if len(true_models) == len(models)
        else "contradiction"
        if not true_models
        else "contingent"
    )
    return Problem(
        "propositional",
        "philosophy",
        f"Is the formula {formula} a tautology, a contradiction, or contingent?",
        f"Its truth table has {len(models)} rows, of which {len(true_models)} make it true, so "
        f"it is {status}.",
        status,
        level,
        {"formula": formula, "variables": names, "question": "status"},
    )


# Categorical syllogisms. Moods: A all S are P, E no S are P, I some S are P, O some S are not P.
# Figures place the middle term M: 1 (M-P, S-M), 2 (P-M, S-M), 3 (M-P, M-S), 4 (P-M, M-S).
_VALID_FORMS = {  # unconditionally valid (Boolean reading, no existential import)
    (1, "AAA"), (1, "EAE"), (1, "AII"), (1, "EIO"),
    (2, "EAE"), (2, "AEE"), (2, "EIO"), (2, "AOO"),
    (3, "IAI"), (3, "AII"), (3, "OAO"), (3, "EIO"),
    (4, "AEE"), (4, "IAI"), (4, "EIO"),
}  # fmt: skip
_TERMS = [
    ("philosophers", "mortals", "thinkers"),
    ("whales", "mammals", "swimmers"),
    ("squares", "rectangles", "polygons"),
    ("poets", "dreamers", "writers"),
    ("metals", "conductors", "elements"),
    ("judges", "lawyers", "scholars"),
    ("ravens", "birds", "creatures"),
    ("prime numbers", "odd numbers", "integers"),
]


def _statement(mood: str, x: str, y: str) -> str:
    return {
        "A": f"All {x} are {y}",
        "E": f"No {x} are {y}",
        "I": f"Some {x} are {y}",
        "O": f"Some {x} are not {y}",
    }[mood]


def _premise_terms(figure: int) -> tuple[tuple[str, str], tuple[str, str]]:
    return {
        1: (("M", "P"), ("S", "M")),
        2: (("P", "M"), ("S", "M")),
        3: (("M", "P"), ("M", "S")),
        4: (("P", "M"), ("M", "S")),
    }[figure]


def syllogism(rng: random.Random, level: float) -> Problem:
    want_valid = rng.random() < 1.0 - 0.5 * level  # invalid forms are harder to see through
    valid_list = sorted(_VALID_FORMS)
    if want_valid:
        figure, mood = rng.choice(valid_list)
    else:
        while True:
            figure, mood = rng.randint(1, 4), "".join(rng.choice("AEIO") for _ in range(3))
            if (figure, mood) not in _VALID_FORMS:
                break
    s, m, p = rng.choice(_TERMS)
    names = {"S": s, "M": m, "P": p}
    (a1, b1), (a2, b2) = _premise_terms(figure)
    major = _statement(mood[0], names[a1], names[b1])
    minor = _statement(mood[1], names[a2], names[b2])
    concl = _statement(mood[2], s, p)
    valid = (figure, mood) in _VALID_FORMS
    answer = "valid" if valid else "invalid"
    return Problem(
        "syllogism",
        "philosophy",
        f"Premises: {major}. {minor}. Conclusion: {concl}. Is the argument valid?",
        f"This is mood {mood} in figure {figure}, which is {answer}"
        + (
            "."
            if valid
            else ": there is a situation where both premises hold and the conclusion fails."
        ),
        answer,
        level,
        {"figure": figure, "mood": mood},
    )


def _holds(mood: str, x: int, y: int, regions: int) -> bool:
    """Does the categorical statement hold in a Venn model? ``regions`` bit r is set when the
    region with membership bits r (bit 0 S, bit 1 M, bit 2 P) is inhabited."""
    inhabited = [r for r in range(8) if regions >> r & 1]
    in_x = [r for r in inhabited if r >> x & 1]
    if mood == "A":
        return all(r >> y & 1 for r in in_x)
    if mood == "E":
        return not any(r >> y & 1 for r in in_x)
    if mood == "I":
        return any(r >> y & 1 for r in in_x)
    return any(not r >> y & 1 for r in in_x)


def syllogism_valid_by_models(figure: int, mood: str) -> bool:
    """Model-check a syllogism over all 256 Venn models of three terms."""
    idx = {"S": 0, "M": 1, "P": 2}
    (a1, b1), (a2, b2) = _premise_terms(figure)
    for regions in range(256):
        if (
            _holds(mood[0], idx[a1], idx[b1], regions)
            and _holds(mood[1], idx[a2], idx[b2], regions)
            and not _holds(mood[2], 0, 2, regions)
        ):
            return False
    return True


_NAMES = ["Ada", "Bo", "Cy", "Dee", "Eli"]


def _kk_statement(rng: random.Random, speaker: int, n: int) -> tuple[str, Any]:
    other = rng.choice([i for i in range(n) if i != speaker])
    kind = rng.choice(["is_knight", "is_knave", "same", "different", "at_least_one_knave"])
    if kind == "is_knight":
        return f"{_NAMES[other]} is a knight", ("knight", other)
    if kind == "is_knave":
        return f"{_NAMES[other]} is a knave", ("knave", other)
    if kind == "same":
        return f"{_NAMES[other]} and I are of the same kind", ("same", speaker, other)
    if kind == "different":
        return f"{_NAMES[other]} and I are of different kinds", ("diff", speaker, other)
    return f"at least one of {_NAMES[other]} and me is a knave", ("oneknave", speaker, other)


def _kk_truth(claim: Any, world: tuple[bool, ...]) -> bool:
    return bool(_kk_truth_any(claim, world))


def _kk_truth_any(claim: Any, world: tuple[bool, ...]) -> Any:
    tag = claim[0]
    if tag == "knight":
        return world[claim[1]]
    if tag == "knave":
        return not world[claim[1]]
    if tag == "same":
        return world[claim[1]] == world[claim[2]]
    if tag == "diff":
        return world[claim[1]] != world[claim[2]]
    return not world[claim[1]] or not world[claim[2]]


def knights_knaves(rng: random.Random, level: float) -> Problem:
    n = 2 + round(level * 2)
    while True:
        stmts = [_kk_statement(rng, i, n) for i in range(n)]
        worlds = [
            w
            for w in itertools.product([True, False], repeat=n)
            if all(_kk_truth(c, w) == w[i] for i, (_, c) in enumerate(stmts))
        ]
        if len(worlds) == 1:
            break
    world = worlds[0]
    said = " ".join(f'{_NAMES[i]} says: "{t}."' for i, (t, _) in enumerate(stmts))
    answer = ", ".join(f"{_NAMES[i]} {'knight' if k else 'knave'}" for i, k in enumerate(world))
    return Problem(
        "knights_knaves",
        "philosophy",
        f"On an island knights always tell the truth and knaves always lie. {said} "
        "Who is a knight and who is a knave?",
        f"Try all {2**n} assignments; only one makes every knight's statement true and every "
        f"knave's statement false: {answer}.",
        answer,
        level,
        {"claims": [list(c) for _, c in stmts]},
    )


# ---- scientific --------------------------------------------------------------------------


def kinematics(rng: random.Random, level: float) -> Problem:
    v0 = Fraction(rng.randint(0, 10 + round(level * 40)))
    a = Fraction(rng.randint(1, 10 + round(level * 20)), rng.choice([1, 2, 4]))
    t = Fraction(rng.randint(1, 5 + round(level * 20)))
    s = v0 * t + a * t * t / 2
    ask_v = rng.random() < 0.5
    answer = v0 + a * t if ask_v else s
    what = "final speed in m/s" if ask_v else "distance travelled in metres"
    return Problem(
        "kinematics",
        "scientific",
        f"A cart starts at {_fmt(v0)} m/s and accelerates uniformly at {_fmt(a)} m/s^2 for "
        f"{_fmt(t)} s. What is its {what}?",
        (
            f"v = v0 + a t = {_fmt(v0)} + {_fmt(a)}*{_fmt(t)} = {_fmt(answer)}."
            if ask_v
            else f"s = v0 t + a t^2 / 2 = {_fmt(v0 * t)} + {_fmt(a * t * t / 2)} = {_fmt(s)}."
        ),
        _fmt(answer),
        level,
        {"v0": _fmt(v0), "a": _fmt(a), "t": _fmt(t), "ask": "v" if ask_v else "s"},
    )


_UNITS = {  # name: (factor to SI, dimension)
    "m": (Fraction(1), "length"),
    "km": (Fraction(1000), "length"),
    "cm": (Fraction(1, 100), "length"),
    "mm": (Fraction(1, 1000), "length"),
    "s": (Fraction(1), "time"),
    "min": (Fraction(60), "time"),
    "h": (Fraction(3600), "time"),
    "g": (Fraction(1, 1000), "mass"),
    "kg": (Fraction(1), "mass"),
    "t": (Fraction(1000), "mass"),
}


def unit_conversion(rng: random.Random, level: float) -> Problem:
    compound = level >= 0.5
    dims = sorted({d for _, d in _UNITS.values()})
    if compound:  # speed-like: length per time
        n1, d1 = rng.choice(["m", "km", "cm"]), rng.choice(["s", "min", "h"])
        n2, d2 = rng.choice(["m", "km", "cm"]), rng.choice(["s", "min", "h"])
        src, dst = f"{n1}/{d1}", f"{n2}/{d2}"
        factor = (_UNITS[n1][0] / _UNITS[d1][0]) / (_UNITS[n2][0] / _UNITS[d2][0])
    else:
        dim = rng.choice(dims)
        units = [u for u, (_, d) in _UNITS.items() if d == dim]
        src, dst = rng.sample(units, 2)
        factor = _UNITS[src][0] / _UNITS[dst][0]
    value = Fraction(rng.randint(1, 10 ** (1 + round(level * 3))))
    result = value * factor
    return Problem(
        "unit_conversion",
        "scientific",
        f"Convert {_fmt(value)} {src} to {dst}.",
        f"Multiply by the conversion factor {_fmt(factor)}: {_fmt(value)} x {_fmt(factor)} = "
        f"{_fmt(result)} {dst}.",
        _fmt(result),
        level,
        {"value": _fmt(value), "src": src, "dst": dst},
    )


# ---- registry and checking -----------------------------------------------------------------

_GENERATORS: dict[str, Callable[[random.Random, float], Problem]] = {
    "arithmetic": arithmetic,
    "linear_equation": linear_equation,
    "gcd": gcd_problem,
    "modular_power": modular_power,
    "sequence": sequence,
    "sum_identity": sum_identity,
    "propositional": propositional,
    "syllogism": syllogism,
    "knights_knaves": knights_knaves,
    "kinematics": kinematics,
    "unit_conversion": unit_conversion,
}
PROBLEM_KINDS = tuple(_GENERATORS)
# multilingual_arithmetic is generated in swarmlm.data.multilingual (number words)
CHECKABLE_KINDS = (*PROBLEM_KINDS, "multilingual_arithmetic")
KINDS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "mathematics": (
        "arithmetic",
        "linear_equation",
        "gcd",
        "modular_power",
        "sequence",
        "sum_identity",
    ),
    "philosophy": ("propositional", "syllogism", "knights_knaves"),
    "scientific": ("kinematics", "unit_conversion"),
}


def generate_problem(kind: str, rng: random.Random, level: float) -> Problem:
    """One problem of ``kind`` at difficulty ``level`` in [0, 1]; raises on an unknown kind."""
    gen = _GENERATORS.get(kind)
    if gen is None:
        raise DataError(f"unknown problem kind {kind!r} (known: {', '.join(PROBLEM_KINDS)})")
    if not 0.0 <= level <= 1.0:
        raise DataError(f"problem difficulty must be in [0, 1], got {level}")
    return gen(rng, level)


def _safe_eval(expr: str) -> Fraction:
    """Evaluate an expression of integer literals, + - * and parentheses (nothing else)."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp):
            ops: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
                ast.Add: operator.add,
                ast.Sub: operator.sub,
                ast.Mult: operator.mul,
            }
            fn = ops.get(type(node.op))
            if fn is not None:
                return fn(walk(node.left), walk(node.right))
        raise ValueError(f"unsupported syntax {ast.dump(node)[:40]} in {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def _parse_kk_answer(answer: str) -> list[bool]:
    out = []
    for part in answer.split(", "):
        _, kind = part.rsplit(" ", 1)
        out.append(kind == "knight")
    return out


def check_problem(p: Problem) -> bool:
    """Re-derive ``p.answer`` from ``p.data`` by a route independent of the generator."""
    d = p.data
    try:
        if p.kind in ("arithmetic", "multilingual_arithmetic"):
            return _safe_eval(d["expression"]) == _parse_fraction(p.answer)
        if p.kind == "linear_equation":
            a, b, c, dd = d["abcd"]
            x = _parse_fraction(p.answer)
            return bool(a * x + b == c * x + dd)  # substitution, not solving
        if p.kind == "gcd":
            g, a, b = int(p.answer), d["a"], d["b"]
            # g divides both and the cofactors are coprime
            if g <= 0 or a % g or b % g:
                return False
            return bool(math.gcd(a // g, b // g) == 1)  # C gcd, not our Euclid loop
        if p.kind == "modular_power":
            return bool(pow(d["base"], d["exp"], d["mod"]) == int(p.answer))
        if p.kind == "sequence":
            t = d["terms"]
            # Fit the lowest-degree polynomial or a geometric rule through the shown terms.
            diffs = [t[i + 1] - t[i] for i in range(4)]
            if len(set(diffs)) == 1:
                return bool(t[-1] + diffs[0] == int(p.answer))
            second = [diffs[i + 1] - diffs[i] for i in range(3)]
            if (
                t[0] != 0
                and all(t[i] != 0 for i in range(4))
                and len({Fraction(t[i + 1], t[i]) for i in range(4)}) == 1
            ):
                return bool(Fraction(t[-1] * t[1], t[0]) == int(p.answer))
            if len(set(second)) == 1:
                return bool(t[-1] + diffs[-1] + second[0] == int(p.answer))
            return False
        if p.kind == "sum_identity":
            _, _, term, _, _ = _SUM_IDENTITIES[d["identity"]]
            return bool(sum(term(k) for k in range(1, d["n"] + 1)) == int(p.answer))
        if p.kind == "propositional":
            formula = d["formula"]
            if d["question"] == "value":
                return str(evaluate_formula(formula, d["env"])).lower() == p.answer
            names = d["variables"]
            values = [
                evaluate_formula(formula, dict(zip(names, bits, strict=True)))
                for bits in itertools.product([False, True], repeat=len(names))
            ]
            status = (
                "tautology" if all(values) else "contingent" if any(values) else "contradiction"
            )
            return status == p.answer
        if p.kind == "syllogism":
            valid = syllogism_valid_by_models(d["figure"], d["mood"])
            return ("valid" if valid else "invalid") == p.answer
        if p.kind == "knights_knaves":
            world = tuple(_parse_kk_answer(p.answer))
            claims = [tuple(c) for c in d["claims"]]
            consistent = all(_kk_truth(c, world) == world[i] for i, c in enumerate(claims))
            unique = (
                sum(
                    all(_kk_truth(c, w) == w[i] for i, c in enumerate(claims))
                    for w in itertools.product([True, False], repeat=len(world))
                )
                == 1
            )
            return consistent and unique
        if p.kind == "kinematics":
            v0, a, t = (_parse_fraction(d[k]) for k in ("v0", "a", "t"))
            v = v0 + a * t
            if d["ask"] == "v":
                return v == _parse_fraction(p.answer)
            return (v0 + v) / 2 * t == _parse_fraction(p.answer)  # mean-speed route
        if p.kind == "unit_conversion":
            value = _parse_fraction(d["value"])

            def si(unit: str) -> Fraction:
                if "/" in unit:
                    num, den = unit.split("/")
                    return _UNITS[num][0] / _UNITS[den][0]
                return _UNITS[unit][0]

            return value * si(d["src"]) == _parse_fraction(p.answer) * si(d["dst"])
    except (KeyError, ValueError, ZeroDivisionError, TypeError, IndexError):
        return False
    raise DataError(f"unknown problem kind {p.kind!r} (known: {', '.join(CHECKABLE_KINDS)})")


def generate_problems(
    kinds: tuple[str, ...] | list[str], rng: random.Random, level: float, count: int
) -> Iterator[Problem]:
    """``count`` checked problems of kinds drawn uniformly from ``kinds``."""
    for _ in range(count):
        p = generate_problem(rng.choice(list(kinds)), rng, level)
        if not check_problem(p):
            raise ProblemCheckError(
                f"generated {p.kind} problem failed its check: {p.question!r} -> {p.answer!r}"
            )
        yield p
