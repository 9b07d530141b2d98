"""The playground in a real browser: Playwright drives Debian's Chromium (headless) against a live server on the tiny
model. The page loads from the server itself; a steered and an unsteered answer stream side by side (same seed) and
differ, with log-probabilities on hover; "explain" colours exactly one cell per prompt token; a vector built from
pasted pairs reaches 100% and is usable at once; a sweep draws layer x scale heatmaps; API errors (a bad layer, a
reserved name, a missing key, analysis that is off) are shown in the page. Screenshots go to the test's tmp_path."""

from __future__ import annotations

import httpx
import pytest

from tests.live import live_server, vec_values

try:  # the browser fixture (tests/conftest.py) fails or skips without it
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover
    expect = None

pytestmark = pytest.mark.browser

@pytest.fixture(scope="module")
def site(engine, tiny_lm, tmp_path_factory):
    with live_server(engine, vector_dir=tmp_path_factory.mktemp("vectors")) as (url, _):
        r = httpx.post(url + "/v1/steering/vectors", json={"name": "calm", "values": vec_values(tiny_lm, 11)})
        assert r.status_code == 201, r.text
        yield url


@pytest.fixture
def other_engine(make_engine, tiny_dir):
    """An engine on its own copy of the tiny model (the module's engine keeps the site's vector store)."""
    from steering.backends.hf import load_model

    return make_engine(load_model(str(tiny_dir), device="cpu", dtype="float32"))


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.problems = problems  # type: ignore[attr-defined]
    yield pg
    context.close()


def shot(page, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def open_playground(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")


def tick(page, vector: str, scale: str | None = None, layers: str | None = None) -> None:
    row = page.locator(f'#vector-table tr[data-name="{vector}"]')
    row.locator("input.use").check()
    if scale is not None:
        row.locator("input.scale").fill(scale)
    if layers is not None:
        row.locator("input.layers").fill(layers)


def generate(page) -> None:
    page.click("#run")  # its handler disables the button before its first await
    page.locator("#run:enabled").wait_for()


def test_the_page_is_served_by_the_server_without_the_internet(page, site, tmp_path, model_name):
    response = page.goto(site + "/")
    assert page.url == site + "/playground"  # / redirects
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    page.wait_for_selector("body[data-ready=true]")
    assert model_name in page.text_content("#server-info")
    assert page.locator('#vector-table tr[data-name="calm"]').count() == 1
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert requested and all(u.startswith(site) for u in requested), requested  # nothing from elsewhere
    assert not page.problems, page.problems  # no script error, no CSP violation
    shot(page, tmp_path, "loaded")


def test_steered_and_unsteered_stream_side_by_side_and_differ(page, site, tmp_path, model_name):
    open_playground(page, site)
    tick(page, "calm", scale="8")
    page.fill("#max-tokens", "24")
    page.fill("#seed", "7")
    generate(page)
    plain, steered = page.locator("#side-plain"), page.locator("#side-steered")
    assert "done" in plain.locator(".status").text_content() and "done" in steered.locator(".status").text_content()
    plain_text, steered_text = plain.locator(".answer").inner_text(), steered.locator(".answer").inner_text()
    assert plain_text and steered_text and plain_text != steered_text
    # streamed: one span per chunk as it arrived
    assert plain.locator(".tok").count() > 1 and steered.locator(".tok").count() > 1
    # the same seed as the page sent: the API gives the same unsteered answer
    direct = httpx.post(site + "/v1/chat/completions", json={
        "model": model_name, "messages": [{"role": "user", "content": page.input_value("#prompt")}],
        "max_tokens": 24, "temperature": 0.7, "seed": 7}).json()
    assert direct["choices"][0]["message"]["content"] == plain_text
    # log-probabilities on hover
    steered.locator(".tok").first.hover()
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    assert "logprob" in tip.inner_text() and "p=" in tip.inner_text()
    shot(page, tmp_path, "side-by-side")
    assert not page.problems, page.problems


@pytest.mark.parametrize("target", ["steered", "contrast"])
def test_explain_colours_one_cell_per_prompt_token(page, site, tmp_path, model_name, target):
    open_playground(page, site)
    tick(page, "calm", scale="8")
    page.fill("#max-tokens", "8")
    generate(page)
    page.select_option("#explain-target", target)
    page.select_option("#explain-method", "saliency")
    page.click("#explain-run")
    page.wait_for_selector("#heatmap .cell")
    cells = page.locator("#heatmap .cell")
    prompt = page.input_value("#prompt")
    tokens = httpx.post(site + "/tokenize", json={"model": model_name,
                                                  "messages": [{"role": "user", "content": prompt}]}).json()
    assert cells.count() == tokens["count"] == len(tokens["tokens"])
    assert [int(c) for c in cells.evaluate_all("cs => cs.map(c => c.dataset.position)")] == list(range(cells.count()))
    colours = set(cells.evaluate_all("cs => cs.map(c => getComputedStyle(c).backgroundColor)"))
    assert len(colours) > 2  # coloured by score, not uniform
    assert page.locator("#explain > .error").is_hidden()
    shot(page, tmp_path, f"explain-{target}")
    assert not page.problems, page.problems


def test_a_vector_built_from_pasted_pairs_reaches_100_percent_and_is_usable_at_once(page, site, tmp_path):
    open_playground(page, site)
    page.fill("#build-name", "pasted")
    page.check("#build-overwrite")
    page.click("#build-run")
    expect(page.locator("#build-percent")).to_have_text("100%")
    page.locator("#build-run:enabled").wait_for()
    assert page.eval_on_selector("#build-progress", "p => p.value") == 1
    assert "succeeded" in page.text_content("#build-status")
    row = page.locator('#vector-table tr[data-name="pasted"]')
    assert row.locator("input.use").is_checked()  # selected in the picker
    assert "pasted" in page.locator("#sweep-vector option").all_text_contents()
    row.locator("input.scale").fill("6")
    generate(page)
    assert "done" in page.locator("#side-steered .status").text_content()
    assert page.locator("#side-steered .error").is_hidden()
    shot(page, tmp_path, "built")
    # then a sweep over layer x scale draws both heatmaps
    page.select_option("#sweep-vector", "pasted")
    page.fill("#sweep-layers", "0-3")
    page.fill("#sweep-scales", "0.5,1,2")
    page.click("#sweep-run")
    expect(page.locator("#sweep-percent")).to_have_text("100%")
    page.wait_for_selector("#plot-margin rect.sweep-cell")
    for plot in ("#plot-accuracy", "#plot-margin"):
        assert page.locator(f"{plot} rect.sweep-cell").count() == 4 * 3
    accuracies = page.locator("#plot-accuracy rect.sweep-cell").evaluate_all("rs => rs.map(r => r.dataset.value)")
    assert all(0 <= float(a) <= 1 for a in accuracies)
    shot(page, tmp_path, "sweep")
    assert not page.problems, page.problems


def test_api_errors_are_shown_in_the_page(page, site, tmp_path):
    open_playground(page, site)
    tick(page, "calm", scale="4", layers="99")  # the tiny model has 4 layers
    generate(page)
    error = page.locator("#side-steered .error")
    assert error.is_visible()
    text = error.inner_text()
    assert text.startswith("400") and "99" in text and "steering" in text
    assert page.locator("#side-plain .error").is_hidden()  # the unsteered answer still came
    assert "done" in page.locator("#side-plain .status").text_content()
    page.fill("#build-name", "build")  # a reserved name
    page.click("#build-run")
    build_error = page.locator("#build > .error")
    build_error.wait_for(state="visible")
    assert "reserved" in build_error.inner_text()
    shot(page, tmp_path, "errors")


def test_a_server_with_a_key_asks_for_it_and_the_key_never_enters_a_url(browser, other_engine, tmp_path):
    with live_server(other_engine, vector_dir=tmp_path / "v", api_key="sesame") as (url, _):
        context = browser.new_context()
        page = context.new_page()
        urls: list[str] = []
        auth: list[str | None] = []
        page.on("request", lambda r: (urls.append(r.url), auth.append(r.headers.get("authorization"))))
        page.goto(url + "/playground")
        page.wait_for_selector("body[data-ready=true]")
        assert "needs an API key" in page.inner_text("#global-error")
        assert "needs a key" in page.inner_text("#key-status")
        shot(page, tmp_path, "key-needed")
        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        page.locator("#global-error").wait_for(state="hidden")
        assert "layers" in page.inner_text("#server-info")
        assert "Bearer sesame" in auth and not any("sesame" in u for u in urls)
        context.close()


def test_analysis_that_is_off_is_said_clearly_and_generation_still_works(browser, other_engine, tmp_path):
    """As with the vLLM backend and --analysis off (501; while it loads, 503 with Retry-After)."""
    with live_server(other_engine, vector_dir=tmp_path / "v", analysis="off") as (url, _):
        page = browser.new_page()
        page.goto(url + "/playground")
        page.wait_for_selector("body[data-ready=true]")
        generate(page)
        assert "done" in page.locator("#side-plain .status").text_content()
        page.select_option("#explain-target", "plain")
        page.click("#explain-run")
        error = page.locator("#explain > .error")
        error.wait_for(state="visible")
        assert error.inner_text().startswith("501") and "generation still works" in error.inner_text()
        shot(page, tmp_path, "analysis-off")
        page.close()


def test_the_playground_routes_without_a_browser(site):
    root = httpx.get(site + "/")
    assert root.status_code == 307 and root.headers["location"] == "playground"
    page = httpx.get(site + "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "playground/playground.js" in page.text and "http" not in page.text.split("<body>")[0]
    js = httpx.get(site + "/playground/playground.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for path in ("/playground/nope.js", "/playground/..%2Fapp.py", "/playground/index.html"):
        r = httpx.get(site + path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
    assert "/playground" not in httpx.get(site + "/openapi.json").json()["paths"]
