"""Numbers in words (English, French, German, Spanish) and arithmetic problems stated in them.

The only multilingual text every machine has offline is what we generate: parallel number
names and small word problems. It is thin (a few hundred distinct words per language); real
multilingual data comes from ``--source multilingual=PATH`` (see docs/data.md).
"""

from __future__ import annotations

import random

from swarmlm.data.problems import Problem

__all__ = ["LANGUAGES", "multilingual_arithmetic", "number_words"]

LANGUAGES = ("en", "fr", "de", "es")

_EN_SMALL = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_EN_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_FR_SMALL = [
    "zéro",
    "un",
    "deux",
    "trois",
    "quatre",
    "cinq",
    "six",
    "sept",
    "huit",
    "neuf",
    "dix",
    "onze",
    "douze",
    "treize",
    "quatorze",
    "quinze",
    "seize",
    "dix-sept",
    "dix-huit",
    "dix-neuf",
]
_FR_TENS = ["_", "_", "vingt", "trente", "quarante", "cinquante", "soixante"]
_DE_SMALL = [
    "null",
    "eins",
    "zwei",
    "drei",
    "vier",
    "fünf",
    "sechs",
    "sieben",
    "acht",
    "neun",
    "zehn",
    "elf",
    "zwölf",
    "dreizehn",
    "vierzehn",
    "fünfzehn",
    "sechzehn",
    "siebzehn",
    "achtzehn",
    "neunzehn",
]
_DE_TENS = [
    "_",
    "_",
    "zwanzig",
    "dreißig",
    "vierzig",
    "fünfzig",
    "sechzig",
    "siebzig",
    "achtzig",
    "neunzig",
]
_ES_SMALL = [
    "cero",
    "uno",
    "dos",
    "tres",
    "cuatro",
    "cinco",
    "seis",
    "siete",
    "ocho",
    "nueve",
    "diez",
    "once",
    "doce",
    "trece",
    "catorce",
    "quince",
    "dieciséis",
    "diecisiete",
    "dieciocho",
    "diecinueve",
    "veinte",
    "veintiuno",
    "veintidós",
    "veintitrés",
    "veinticuatro",
    "veinticinco",
    "veintiséis",
    "veintisiete",
    "veintiocho",
    "veintinueve",
]
_ES_TENS = [
    "_",
    "_",
    "_",
    "treinta",
    "cuarenta",
    "cincuenta",
    "sesenta",
    "setenta",
    "ochenta",
    "noventa",
]
_ES_HUNDREDS = [
    "_",
    "ciento",
    "doscientos",
    "trescientos",
    "cuatrocientos",
    "quinientos",
    "seiscientos",
    "setecientos",
    "ochocientos",
    "novecientos",
]


def _en(n: int) -> str:
    if n < 20:
        return _EN_SMALL[n]
    if n < 100:
        return _EN_TENS[n // 10] + ("" if n % 10 == 0 else "-" + _EN_SMALL[n % 10])
    if n < 1000:
        rest = n % 100
        return _EN_SMALL[n // 100] + " hundred" + ("" if rest == 0 else " " + _en(rest))
    rest = n % 1000
    return _en(n // 1000) + " thousand" + ("" if rest == 0 else " " + _en(rest))


def _fr_below_100(n: int) -> str:
    if n < 20:
        return _FR_SMALL[n]
    tens, unit = divmod(n, 10)
    if tens in (7, 9):  # soixante-dix..., quatre-vingt-dix...
        base = "soixante" if tens == 7 else "quatre-vingt"
        sep = " et " if n == 71 else "-"
        return base + sep + _FR_SMALL[10 + unit]
    if tens == 8:
        return "quatre-vingts" if unit == 0 else "quatre-vingt-" + _FR_SMALL[unit]
    if unit == 0:
        return _FR_TENS[tens]
    return _FR_TENS[tens] + (" et un" if unit == 1 else "-" + _FR_SMALL[unit])


def _fr(n: int) -> str:
    if n < 100:
        return _fr_below_100(n)
    if n < 1000:
        h, rest = divmod(n, 100)
        head = "cent" if h == 1 else _FR_SMALL[h] + (" cents" if rest == 0 else " cent")
        return head + ("" if rest == 0 else " " + _fr_below_100(rest))
    t, rest = divmod(n, 1000)
    head = "mille" if t == 1 else _fr(t) + " mille"
    return head + ("" if rest == 0 else " " + _fr(rest))


def _de(n: int) -> str:
    if n < 20:
        return _DE_SMALL[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        if unit == 0:
            return _DE_TENS[tens]
        return ("ein" if unit == 1 else _DE_SMALL[unit]) + "und" + _DE_TENS[tens]
    if n < 1000:
        h, rest = divmod(n, 100)
        head = ("ein" if h == 1 else _DE_SMALL[h]) + "hundert"
        return head + ("" if rest == 0 else _de(rest))
    t, rest = divmod(n, 1000)
    head = ("ein" if t == 1 else _de(t)) + "tausend"
    return head + ("" if rest == 0 else _de(rest))


def _es(n: int) -> str:
    if n < 30:
        return _ES_SMALL[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _ES_TENS[tens] + ("" if unit == 0 else " y " + _ES_SMALL[unit])
    if n < 1000:
        h, rest = divmod(n, 100)
        if n == 100:
            return "cien"
        return _ES_HUNDREDS[h] + ("" if rest == 0 else " " + _es(rest))
    t, rest = divmod(n, 1000)
    head = "mil" if t == 1 else _es(t) + " mil"
    return head + ("" if rest == 0 else " " + _es(rest))


_WORDS = {"en": _en, "fr": _fr, "de": _de, "es": _es}


def number_words(n: int, lang: str) -> str:
    """``n`` (0 <= n < 1,000,000) written out in ``lang`` (one of ``LANGUAGES``)."""
    if lang not in _WORDS:
        raise ValueError(f"unknown language {lang!r} (known: {', '.join(LANGUAGES)})")
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words covers 0..999999, got {n}")
    return _WORDS[lang](n)


_TEMPLATES = {
    "fr": ("Combien font {a} {op} {b} ?", "plus", "moins", "fois", "Réponse"),
    "de": ("Wie viel ist {a} {op} {b}?", "plus", "minus", "mal", "Antwort"),
    "es": ("¿Cuánto es {a} {op} {b}?", "más", "menos", "por", "Respuesta"),
}


def multilingual_arithmetic(rng: random.Random, level: float) -> Problem:
    """An arithmetic problem stated in French, German or Spanish number words; answer in
    digits and words. Checked like ``arithmetic`` (the digits are in ``data``)."""
    lang = rng.choice(sorted(_TEMPLATES))
    template, plus, minus, times, answer_word = _TEMPLATES[lang]
    hi = 10 + round(level * 990)
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    op = rng.choice("+-*")
    if op == "-" and b > a:
        a, b = b, a
    if op == "*":
        b = rng.randint(0, 12 + round(level * 40))
    value = a + b if op == "+" else a - b if op == "-" else a * b
    word = {"+": plus, "-": minus, "*": times}[op]
    question = template.format(a=number_words(a, lang), op=word, b=number_words(b, lang))
    solution = f"{a} {op} {b} = {value} ({number_words(value, lang)}; English: {_en(value)})."
    return Problem(
        "multilingual_arithmetic",
        "multilingual",
        question,
        solution,
        str(value),
        level,
        {"expression": f"{a} {op} {b}", "lang": lang, "answer_word": answer_word},
    )
