"""Views of credit: the HTML page escapes all text, fetches nothing, aligns the first differing token and
renders coloured tokens in headless Chromium; the terminal view cannot be styled by model text; the PNG draws."""

import copy
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from r2q.credit import score_pairs, score_texts
from r2q.models import load_model
from r2q.views import display_piece, reward_rgb, vmax_of
from r2q.views.html import render_html, write_html
from r2q.views.plots import plot_credit
from r2q.views.terminal import render_terminal

EVIL = {"prompt": 'say <img src=x onerror=alert(1)> & "hi" \u202egnp.exe',
        "chosen": " good. the end",
        "rejected": ' <script>alert(1)</script> "quotes" & <b>bold</b> $x$ [bold]rich[/bold]\x1b[31m'}
ROWS = [EVIL, {"prompt": "the movie", "chosen": " was great.\nreally fun", "rejected": " was bad.\nboring"},
        {"prompt": "12+30=", "chosen": "42", "rejected": "47"}]


@pytest.fixture(scope="module")
def report(llama_dir, llama_ref_dir, tokenizer):
    return score_pairs(load_model(llama_dir), load_model(llama_ref_dir), tokenizer, ROWS, 0.5, use_cache=False)


class Page(HTMLParser):
    """Tags, attributes and the text of each token span, in order."""

    def __init__(self):
        super().__init__()
        self.tags, self.tokens, self._in_tok, self.cells = [], [], False, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "div" and a.get("class") in ("prefix", "tail"):
            self.cells.append((a["class"], []))
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self._in_tok = True
            self.tokens.append([a, ""])
            if self.cells:
                self.cells[-1][1].append(self.tokens[-1])

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_tok = False

    def handle_data(self, data):
        if self._in_tok:
            self.tokens[-1][1] += data


def parse(page: str) -> Page:
    p = Page()
    p.feed(page)
    return p


def test_colour_scale_is_diverging_and_centred_at_zero():
    assert reward_rgb(0.0, 1.0) == (255, 255, 255)
    red, blue = reward_rgb(-1.0, 1.0), reward_rgb(1.0, 1.0)
    assert red[0] > red[2] and blue[2] > blue[0]
    assert reward_rgb(-5.0, 1.0) == red  # clipped at vmax
    light, dark = reward_rgb(-0.2, 1.0), reward_rgb(-0.8, 1.0)
    assert sum(light) > sum(dark)  # stronger reward, stronger colour
    assert vmax_of([[0.1, -0.7], [0.3]]) == 0.7 and vmax_of([[0.0]]) == 1.0


def test_html_escapes_every_piece_of_text(report):
    page = render_html(report)
    assert "<script" not in page.lower() and "<b>" not in page and "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &quot;hi&quot;" in page  # the prompt, in one piece
    p = parse(page)
    assert {t for t, _ in p.tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "div",
                                      "span", "section", "table", "tr", "td", "th", "br", "sub"}
    # each completion's spans spell its text (control characters made visible), and each tooltip has the numbers
    rejected = report.pairs[0].rejected
    spans = [t for t in p.tokens if "reward" in t[0].get("title", "")]
    texts = "".join(text for _, text in spans)
    assert "".join(display_piece(x) for x in rejected.tokens) in texts
    assert '<script>alert(1)</script> "quotes" & <b>bold</b>' in texts  # as text, once unescaped by the parser
    assert "\\x1b[31m" in texts and "\x1b" not in page
    assert "\u202e" not in page and "\\u202egnp.exe" in page  # a bidi override in the prompt is shown, not obeyed
    first = next(a for a, text in spans if text == display_piece(rejected.tokens[0]) and
                 f"{rejected.rewards[0]!r}" == a["data-reward"])
    assert f"log pi {rejected.logps[0]:+.6f}" in first["title"]
    assert f"log pi_ref {rejected.ref_logps[0]:+.6f}" in first["title"]


def test_html_is_self_contained(report, tmp_path):
    page = write_html(report, tmp_path / "credit.html").read_text()
    assert not re.search(r"""(src|href|action|poster|data)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert not re.search(r"@import|url\s*\(", page, re.I)
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", page, re.I)


def test_first_differing_token_is_aligned(report):
    """Both columns of a pair start their second row at the first differing token."""
    p = parse(render_html(report))
    tails = [tokens for cls, tokens in p.cells if cls == "tail"]
    for pair, (tail_c, tail_r) in zip(report.pairs, zip(tails[0::2], tails[1::2])):
        k = pair.first_diff
        assert tail_c[0][1] == display_piece(pair.chosen.tokens[k])
        assert tail_r[0][1] == display_piece(pair.rejected.tokens[k])
        assert "first-diff" in tail_c[0][0]["class"] and "first-diff" in tail_r[0][0]["class"]


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _screenshot_colours(report, tmp_path, name: str) -> tuple[int, int, float]:
    """(reddish, bluish) saturated pixel counts and the pixel std of a headless Chromium screenshot."""
    import matplotlib.image

    page = write_html(report, tmp_path / f"{name}.html")
    shot = tmp_path / f"{name}.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    rgb = matplotlib.image.imread(shot)[..., :3].astype(np.float64)
    mx, mn = rgb.max(-1), rgb.min(-1)
    saturated = (mx - mn) / np.maximum(mx, 1e-6) > 0.35
    reds = saturated & (rgb[..., 0] > rgb[..., 2] + 0.2)
    blues = saturated & (rgb[..., 2] > rgb[..., 0] + 0.2)
    return int(reds.sum()), int(blues.sum()), float(rgb.std())


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_html_renders_coloured_tokens_in_headless_chromium(report, tmp_path):
    """The page renders, and its tokens add red and blue pixels to what the same page shows with every reward
    0 (white tokens: only the legend and the verdicts are coloured there)."""
    reds, blues, std = _screenshot_colours(report, tmp_path, "credit")
    zero = copy.deepcopy(report)
    for item in zero.items():
        item.rewards = [0.0] * len(item.rewards)
    reds0, blues0, _ = _screenshot_colours(zero, tmp_path, "zero")
    assert std > 0.05, "blank page"
    assert reds - reds0 > 1000 and blues - blues0 > 1000, (reds, reds0, blues, blues0)


def test_terminal_view_is_not_styled_by_model_text(report):
    from rich.console import Console

    console = Console(record=True, width=120, color_system="truecolor", force_terminal=True)
    render_terminal(report, console)
    text = console.export_text(clear=False)
    assert "<script>alert(1)</script>" in text and "[bold]rich[/bold]" in text  # shown, not interpreted
    assert "\\x1b[31m" in text
    assert "rewards/accuracies" in text and "tokens with the largest mean reward" in text
    ansi = console.export_text(styles=True)
    assert "\x1b[31m" not in ansi.replace("\\x1b[31m", "")  # the model's escape sequence never reaches the tty
    assert "48;2;" in ansi  # truecolor backgrounds


def test_png_figure(report, llama_dir, tokenizer, tmp_path):
    import matplotlib.image

    path = plot_credit(report, tmp_path / "credit.png")
    img = (matplotlib.image.imread(path)[..., :3] * 255).round()
    assert img.shape[0] > 500 and img.shape[1] > 500
    # the largest reward of the figure is drawn in full blue, the most negative in full red (the shared scale)
    shown = [c for p in report.pairs[:4] for c in (p.chosen, p.rejected)]
    vmax = vmax_of(c.rewards for c in shown)
    for r in (max(r for c in shown for r in c.rewards), min(r for c in shown for r in c.rewards)):
        want = np.array(reward_rgb(r, vmax))
        assert (np.abs(img - want).max(-1) <= 2).sum() > 20, (r, want)
    single = score_texts(load_model(llama_dir), None, tokenizer, ["p"], [" costs $5 and $6"], 0.1)
    assert matplotlib.image.imread(plot_credit(single, tmp_path / "one.png")).shape[0] > 100
