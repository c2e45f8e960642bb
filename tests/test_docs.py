"""The documentation pages that must follow the code."""
from pathlib import Path

from serve_app.config import (
    ApiKeyConfig, AppArgs, AuthConfig, JobsConfig, LimitsConfig, RateLimitConfig, RuntimeConfig, TileConfig, UrlConfig,
    WeightsConfig,
)

ROOT = Path(__file__).resolve().parent.parent


def test_the_configuration_page_lists_every_setting_and_no_other():
    page = (ROOT / "docs" / "configuration.md").read_text()
    listed = {line.split("`")[1] for line in page.splitlines() if line.startswith("| `")}
    fields = set()
    for model, prefix in ((AppArgs, "args."), (WeightsConfig, "args.weights."), (RuntimeConfig, ""),
                          (TileConfig, "args.tile."), (LimitsConfig, "limits."),
                          (JobsConfig, "args.jobs."), (UrlConfig, "args.jobs.urls."), (AuthConfig, "args.auth."),
                          (ApiKeyConfig, ""), (RateLimitConfig, "rate_limit.")):
        fields |= {prefix + name for name in model.model_fields}
    assert listed == fields, (sorted(fields - listed), sorted(listed - fields))


def test_the_readme_stays_short_and_its_doc_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in ("architecture", "configuration", "api", "operations", "performance", "weights", "jobs"):
        assert f"docs/{page}.md" in readme and (ROOT / "docs" / f"{page}.md").is_file()
