"""The run table's filter language: a small hand-written tokenizer and recursive-descent parser.

    optim.lr < 0.003 and val_acc@1 > 0.8
    (state == 'succeeded' or state == 'running') and not tag == 'baseline'
    name ~ 'resnet' and model.name != "vit"

It turns user text into a tree of plain tuples (never evaluated as code); runtable.py compiles the tree into
SQLAlchemy expressions. A bad expression is a FilterError whose message names the position it stopped at.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_LENGTH = 2000
MAX_DEPTH = 32
MAX_COMPARISONS = 64
OPERATORS = ("==", "!=", "<=", ">=", "<", ">", "=", "~")
KEYWORDS = {"and", "or", "not", "true", "false", "null"}
# a name is a config key (optim.lr), a metric (val_acc@1, test_acc@1) or a column (state, name, tag)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.@/]*")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class FilterError(ValueError):
    """An expression that cannot be parsed: the message says what was expected, `position` where (0-based)."""

    def __init__(self, message: str, position: int):
        super().__init__(f"{message} at position {position + 1}")
        self.position = position


@dataclass(frozen=True)
class Token:
    kind: str  # name, number, string, op, lparen, rparen, keyword, end
    text: str
    value: object
    position: int


@dataclass(frozen=True)
class Comparison:
    """`name op value`: value is a float, a str, a bool or None (null)."""

    name: str
    op: str
    value: object
    position: int


def tokenize(text: str) -> list[Token]:
    """The tokens of `text`, ending with an 'end' token; FilterError at the first character that starts none."""
    if len(text) > MAX_LENGTH:
        raise FilterError(f"the expression is longer than {MAX_LENGTH} characters", MAX_LENGTH)
    tokens, i = [], 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "()":
            tokens.append(Token("lparen" if char == "(" else "rparen", char, None, i))
            i += 1
        elif char in "'\"":
            end = text.find(char, i + 1)
            if end < 0:
                raise FilterError(f"unterminated string (no closing {char})", i)
            tokens.append(Token("string", text[i : end + 1], text[i + 1 : end], i))
            i = end + 1
        elif (op := next((o for o in OPERATORS if text.startswith(o, i)), None)) is not None:
            tokens.append(Token("op", op, "==" if op == "=" else op, i))
            i += len(op)
        elif (number := NUMBER.match(text, i)) is not None:
            value = float(number.group())
            if not math.isfinite(value):
                raise FilterError(f"{number.group()!r} is not a finite number", i)
            tokens.append(Token("number", number.group(), value, i))
            i = number.end()
        elif (name := NAME.match(text, i)) is not None:
            word = name.group()
            kind = "keyword" if word.lower() in KEYWORDS else "name"
            tokens.append(Token(kind, word, word.lower() if kind == "keyword" else word, i))
            i = name.end()
        else:
            raise FilterError(f"unexpected character {char!r}", i)
    tokens.append(Token("end", "", None, len(text)))
    return tokens


def parse(text: str) -> tuple | Comparison | None:
    """The tree of `text`: ('and', a, b), ('or', a, b), ('not', a) or a Comparison; None for an empty expression."""
    if not text.strip():
        return None
    parser = _Parser(tokenize(text))
    tree = parser.expression(0)
    token = parser.peek()
    if token.kind != "end":
        raise FilterError(f"expected 'and', 'or' or the end, found {token.text!r}", token.position)
    return tree


class _Parser:
    def __init__(self, tokens: list[Token]):
        self.tokens, self.at, self.comparisons = tokens, 0, 0

    def peek(self) -> Token:
        return self.tokens[self.at]

    def take(self) -> Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token.kind == "keyword" and token.value == word:
            self.at += 1
            return True
        return False

    def expression(self, depth: int):
        if depth > MAX_DEPTH:
            raise FilterError(f"parentheses or 'not' nested deeper than {MAX_DEPTH}", self.peek().position)
        tree = self.conjunction(depth)
        while self.keyword("or"):
            tree = ("or", tree, self.conjunction(depth))
        return tree

    def conjunction(self, depth: int):
        tree = self.negation(depth)
        while self.keyword("and"):
            tree = ("and", tree, self.negation(depth))
        return tree

    def negation(self, depth: int):
        if self.keyword("not"):
            if depth + 1 > MAX_DEPTH:
                raise FilterError(f"parentheses or 'not' nested deeper than {MAX_DEPTH}", self.peek().position)
            return ("not", self.negation(depth + 1))
        return self.atom(depth)

    def atom(self, depth: int):
        token = self.take()
        if token.kind == "lparen":
            tree = self.expression(depth + 1)
            closing = self.take()
            if closing.kind != "rparen":
                raise FilterError(
                    f"expected ')' to close the '(' at position {token.position + 1}, found {_shown(closing)}", closing.position
                )
            return tree
        if token.kind != "name":
            raise FilterError(f"expected a column name (a config key such as optim.lr, or a metric), found {_shown(token)}", token.position)
        op = self.take()
        if op.kind != "op":
            raise FilterError(f"expected a comparison (== != < <= > >= ~) after {token.text!r}, found {_shown(op)}", op.position)
        value = self.take()
        if value.kind in ("number", "string"):
            literal = value.value
        elif value.kind == "keyword" and value.value in ("true", "false", "null"):
            literal = {"true": True, "false": False, "null": None}[value.value]
        else:
            raise FilterError(
                f"expected a number, a quoted string, true, false or null after {op.text!r}, found {_shown(value)}", value.position
            )
        self.comparisons += 1
        if self.comparisons > MAX_COMPARISONS:
            raise FilterError(f"more than {MAX_COMPARISONS} comparisons", token.position)
        return Comparison(token.text, op.value, literal, token.position)


def _shown(token: Token) -> str:
    return "the end" if token.kind == "end" else repr(token.text)
