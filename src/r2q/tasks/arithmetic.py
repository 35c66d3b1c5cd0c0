"""Column addition with worked steps: a reasoning task whose errors have a known position (no dependencies).

A prompt is ``"17+25="``. The correct completion adds digit columns from the right, one line per column, writing
the incoming carry as a third term when there is one, then the answer on its own line:

    17+25=        prompt
    7+5=12        column 1: 7 + 5 = 12, write 2, carry 1
    1+2+1=4       column 2: 1 + 2 + carry 1 = 4
    42            the answer (the written digits, last carry first)

The shorter operand is padded with 0 digits ("7+25=" -> "7+5=12\\n0+2+1=3\\n32"). Lines are joined by "\\n",
the step delimiter of `r2q.rewards.step_ends_from_text`, so step rewards line up with columns.

A rejected completion has one error, of one of three kinds, and is otherwise produced by the same procedure, so
everything after the error follows from it (a wrong step changes the carry and the answer consistently):

- ``"step"``: one column's sum is wrong (off by 1 to 3, within 0..19);
- ``"carry"``: one incoming carry is dropped (the column is summed without it);
- ``"answer"``: the steps are right, one digit of the final answer is wrong.

A preference row is ``{"prompt", "chosen", "rejected", "error_char", "kind"}`` where ``error_char`` indexes the
completion strings: ``chosen[:error_char] == rejected[:error_char]`` and the characters at ``error_char``
differ. Everything before it is correct, so it is the first error.
"""

from __future__ import annotations

import random

KINDS = ("step", "carry", "answer")


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def _digits(n: int, width: int) -> list[int]:
    """Least significant first, zero-padded to `width`."""
    return [(n // 10**i) % 10 for i in range(width)]


def _work(a: int, b: int, wrong_sum: tuple[int, int] | None = None, drop_carry: int | None = None,
          wrong_answer: tuple[int, int] | None = None) -> str:
    """The worked completion, with optional errors: column k's sum replaced (k, value), column k's incoming
    carry dropped, or answer digit i (from the left) replaced (i, digit)."""
    if a < 0 or b < 0:
        raise ValueError("operands must be non-negative")
    width = max(len(str(a)), len(str(b)))
    lines, written, carry = [], [], 0
    for k, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        cin = 0 if drop_carry == k else carry
        s = x + y + cin
        if wrong_sum is not None and wrong_sum[0] == k:
            s = wrong_sum[1]
        lines.append(f"{x}+{y}+{cin}={s}" if cin else f"{x}+{y}={s}")
        written.append(s % 10)
        carry = s // 10
    answer = ("1" if carry else "") + "".join(str(d) for d in reversed(written))
    answer = answer.lstrip("0") or "0"
    if wrong_answer is not None:
        i, d = wrong_answer
        answer = answer[:i] + str(d) + answer[i + 1:]
    return "\n".join(lines + [answer])


def solution(a: int, b: int) -> str:
    """The correct worked completion for ``a+b=``."""
    return _work(a, b)


def first_difference(x: str, y: str) -> int | None:
    """The first index where two strings differ (the shorter one's length if one is a prefix); None if equal."""
    if x == y:
        return None
    n = min(len(x), len(y))
    return next((i for i in range(n) if x[i] != y[i]), n)


def first_error(a: int, b: int, completion: str) -> int | None:
    """Index of the first character of `completion` that departs from the correct worked solution; None if none."""
    return first_difference(solution(a, b), completion)


def answer_of(completion: str) -> str:
    """The last line: the stated answer."""
    return completion.rsplit("\n", 1)[-1].strip()


def is_correct(prompt: str, completion: str) -> bool:
    """The gold reward: does the stated answer equal the sum? (steps are not checked)"""
    a, b = (int(t) for t in prompt.rstrip("=").split("+"))
    return answer_of(completion) == str(a + b)


def corrupt(a: int, b: int, kind: str, rng: random.Random) -> str:
    """A completion for ``a+b=`` with one error of the given kind (see the module docstring)."""
    width = max(len(str(a)), len(str(b)))
    if kind == "step":
        k = rng.randrange(width)
        good = _sums(a, b)[k]
        wrong = rng.choice([s for s in range(max(0, good - 3), min(19, good + 3) + 1) if s != good])
        return _work(a, b, wrong_sum=(k, wrong))
    if kind == "carry":
        ks = [k for k, c in enumerate(_carries_in(a, b)) if c]
        if not ks:
            raise ValueError(f"{a}+{b} has no carry to drop")
        return _work(a, b, drop_carry=rng.choice(ks))
    if kind == "answer":
        ans = str(a + b)
        i = rng.randrange(len(ans))
        choices = [d for d in range(1 if i == 0 and len(ans) > 1 else 0, 10) if str(d) != ans[i]]
        return _work(a, b, wrong_answer=(i, rng.choice(choices)))
    raise ValueError(f"unknown error kind {kind!r}; use one of {', '.join(KINDS)}")


def _sums(a: int, b: int) -> list[int]:
    width = max(len(str(a)), len(str(b)))
    out, carry = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        out.append(x + y + carry)
        carry = out[-1] // 10
    return out


def _carries_in(a: int, b: int) -> list[int]:
    return [0] + [s // 10 for s in _sums(a, b)[:-1]]


def make_pairs(n: int, seed: int = 0, digits: int = 2, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """n preference rows on random ``a+b`` with 1..`digits`-digit operands, error kinds cycled in order.

    A "carry" row needs a sum with a carry; problems are redrawn until one fits.
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown error kind {k!r}; use one of {', '.join(KINDS)}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        while True:
            a, b = rng.randrange(10**digits), rng.randrange(10**digits)
            if kind != "carry" or any(_carries_in(a, b)):
                break
        chosen, rejected = solution(a, b), corrupt(a, b, kind, rng)
        rows.append({"prompt": prompt_text(a, b), "chosen": chosen, "rejected": rejected,
                     "error_char": first_difference(chosen, rejected), "kind": kind})
    return rows
