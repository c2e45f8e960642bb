"""bench.run --merge: reports of sections run one after the other become one report."""
import pytest

from bench.run import merge


def _report(sections: dict, device: str = "NVIDIA H100 80GB HBM3", wall_s: float = 100.0) -> dict:
    return {"device": device, "cpus": 16, "versions": {"torch": "2.11.0", "ray": "2.60.0"},
            "settings": {"tile": 256, "sections": list(sections)}, **sections, "wall_s": wall_s}


def test_merge_joins_the_sections_and_adds_up_the_walls():
    engines = _report({"engines": {"matmul_peak_tflops": 791}, "call_styles": {"bare_loop_ms": 78}}, wall_s=310)
    served = _report({"served": {"upscale": {"best_images_per_s": 96.3}}}, wall_s=320)
    merged = merge([engines, served])
    assert merged["engines"] == engines["engines"] and merged["served"] == served["served"]
    assert merged["call_styles"] == engines["call_styles"]
    assert merged["settings"]["sections"] == ["engines", "call_styles", "served"]
    assert merged["settings"]["merged_runs"] == 2 and merged["wall_s"] == 630


def test_merge_refuses_reports_from_different_devices():
    with pytest.raises(ValueError, match="device"):
        merge([_report({"engines": {}}), _report({"served": {}}, device="NVIDIA H200")])
