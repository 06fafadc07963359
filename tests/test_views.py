from mechsub import views


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


def test_views_render_offline_in_headless_chromium(tmp_path, ink):
    html = _page()
    (tmp_path / "views.html").write_text(html)
    # the same page with its script removed: headings only, what a page that fails to render looks like
    head, tail = html.split('<script crossorigin type="module">', 1)
    (tmp_path / "blank.html").write_text(head + tail.split("</script>", 1)[1])
    assert ink(tmp_path / "views.html") > 5 * max(ink(tmp_path / "blank.html"), 100)


def test_the_same_views_give_the_same_page():
    import circuitsvis.tokens as cv

    from mechsub.views import page

    def build() -> str:
        return page([("a", cv.colored_tokens(tokens=["x", "y"], values=[0.1, 0.2])),
                     ("b", cv.colored_tokens(tokens=["z"], values=[0.3]))], "t")  # fmt: skip

    first = build()
    assert first == build() and "circuits-vis-0" in first and "circuits-vis-1" in first
