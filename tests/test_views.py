import shutil
import subprocess

import pytest

from mechsub import views

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _ink(png_path) -> int:
    """Pixels that are not near-white in a screenshot."""
    from PIL import Image

    img = Image.open(png_path).convert("L")
    return sum(1 for v in img.getdata() if v < 200)


def _screenshot(html_path, png_path) -> None:
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--virtual-time-budget=8000", "--window-size=1000,1400",
         f"--screenshot={png_path}", f"file://{html_path}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def _page():
    from circuitsvis.attention import attention_patterns
    from circuitsvis.tokens import colored_tokens

    toks = ["1", "2", "3", ",", " ", "4"]
    import torch

    att = torch.tril(torch.ones(2, 6, 6))
    att = att / att.sum(-1, keepdim=True)
    return views.page([("attention", attention_patterns(toks, att)),
                       ("tokens", colored_tokens(toks, [0.1, -0.5, 0.9, 0.0, 0.3, -1.0]))], "test")  # fmt: skip


def test_page_shares_one_script_and_needs_no_network():
    html = _page()
    assert html.count("var CircuitsVis") == 1 and html.count("CircuitsVis.render(") == 2
    assert views.is_offline(html)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_views_render_offline_in_headless_chromium(tmp_path):
    html = _page()
    (tmp_path / "views.html").write_text(html)
    # the same page with its script removed: headings only, what a page that fails to render looks like
    head, tail = html.split('<script crossorigin type="module">', 1)
    (tmp_path / "blank.html").write_text(head + tail.split("</script>", 1)[1])
    _screenshot(tmp_path / "views.html", tmp_path / "views.png")
    _screenshot(tmp_path / "blank.html", tmp_path / "blank.png")
    assert _ink(tmp_path / "views.png") > 5 * max(_ink(tmp_path / "blank.png"), 100)


def test_the_same_views_give_the_same_page():
    import circuitsvis.tokens as cv

    from mechsub.views import page

    def build() -> str:
        return page([("a", cv.colored_tokens(tokens=["x", "y"], values=[0.1, 0.2])),
                     ("b", cv.colored_tokens(tokens=["z"], values=[0.3]))], "t")  # fmt: skip

    first = build()
    assert first == build() and "circuits-vis-0" in first and "circuits-vis-1" in first
